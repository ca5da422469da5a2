"""bench/mfu.py on a GPU: two LLaMA-7B-shaped blocks in bf16, MFU against the device's peak.

Run with `pytest -m gpu -s tests/gpu` on a CUDA machine (-s shows the numbers); skipped without CUDA."""

import json
import time

import pytest
import torch

from splitlora_ds.bench.mfu import main
from splitlora_ds.bench.peaks import table_peak

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (torch.cuda.is_available() is False)"),
]


@pytest.mark.parametrize("with_head", [False, True], ids=["middle-stage", "last-stage"])
def test_llama7b_server_stage_mfu_on_gpu(tmp_path, capsys, with_head):
    args = ["--model", "llama-7b", "--layers", "2", "--dtype", "bfloat16", "--device", "cuda",
            "--steps", "10", "--warmup", "3", "--out", str(tmp_path)] + (["--with-head"] if with_head else [])
    t0 = time.perf_counter()
    assert main(args) == 0
    wall = time.perf_counter() - t0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads((tmp_path / "mfu.json").read_text())
    with capsys.disabled():
        print("\n" + line)
        print(f"  flops/step {result['flops_per_step']:.4g}, median {result['median_step_seconds'] * 1e3:.2f} ms, "
              f"steps {[round(s * 1e3, 2) for s in result['step_seconds']]} ms, "
              f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB, build {result['build_seconds']:.1f} s")

    assert result["device"].startswith("cuda") and result["timing"].startswith("CUDA events")
    assert result["flops_per_step"] > 0 and result["achieved_tflops"] > 0
    assert sum(result["step_seconds"]) < wall
    if table_peak(result["device_name"], torch.bfloat16) is None:
        pytest.skip(f"{result['device_name']!r} has no peak in bench/peaks.py; MFU cannot be checked")
    assert result["peak_tflops"] > 0 and 0 < result["mfu"] < 1
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / result["peak_tflops"])
