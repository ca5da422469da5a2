"""bench/mfu.py: a tiny LLaMA server stage on the CPU; its FLOPs against a hand count, its timing,
achieved TFLOP/s and MFU arithmetic, the peak table and bad input."""

import json
import statistics
import time
from types import SimpleNamespace

import pytest
import torch

from splitlora_ds.bench import measure
from splitlora_ds.bench.measure import time_steps
from splitlora_ds.bench.mfu import main
from splitlora_ds.bench.peaks import table_peak
from splitlora_ds.bench.server_step import MODELS

RANK, CLIENTS, BATCH, SEQ, LAYERS = 4, 3, 2, 32, 2
TARGETS = ("q_proj", "v_proj")


def run(tmp_path, *extra: str) -> tuple[dict, float]:
    args = ["--model", "tiny", "--dtype", "float32", "--device", "cpu", "--steps", "2", "--warmup", "1",
            "--layers", str(LAYERS), "--clients", str(CLIENTS), "--batch", str(BATCH), "--seq", str(SEQ),
            "--lora-rank", str(RANK), "--targets", ",".join(TARGETS), "--out", str(tmp_path), *extra]
    t0 = time.perf_counter()
    assert main(args) == 0
    wall = time.perf_counter() - t0
    return json.loads((tmp_path / "mfu.json").read_text()), wall


def hand_count(with_head: bool) -> int:
    """FLOPs of one step, counted by hand (2 per multiply-add).

    Base weights are frozen: their backward computes the input gradient only (1x forward).
    LoRA A and B get input and weight gradients (2x forward). Attention is dense T x T; torch's
    formula for its backward counts 5 matmuls (the scores are recomputed), its forward 2.
    The head projects only positions with a next token and is frozen (1x forward backward)."""
    c = MODELS["tiny"]
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    rows = CLIENTS * BATCH
    tokens = rows * SEQ
    base = h * h + 2 * h * kv + h * h + 3 * h * inter  # q, k, v, o, gate/up/down
    lora_in_out = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h)}
    lora = sum(RANK * (i + o) for i, o in (lora_in_out[t] for t in TARGETS))
    per_block = (2 * tokens * base) * 2 + (2 * tokens * lora) * 3 + (2 * rows * SEQ * SEQ * h) * (2 + 5)
    head = (2 * rows * (SEQ - 1) * h * v) * 2 if with_head else 0
    return LAYERS * per_block + head


@pytest.mark.parametrize("with_head", [False, True])
def test_tiny_stage_on_cpu_flops_time_and_no_peak(tmp_path, capsys, with_head):
    result, wall = run(tmp_path, *(["--with-head"] if with_head else []))
    assert result["with_head"] is with_head and result["blocks"] == LAYERS
    assert result["tokens"] == CLIENTS * BATCH * SEQ
    assert result["flops_per_step"] == pytest.approx(hand_count(with_head), rel=1e-3)

    seconds = result["step_seconds"]
    assert len(seconds) == 2 and all(s > 0 for s in seconds)  # warm-up steps left out
    assert result["median_step_seconds"] == statistics.median(seconds)
    assert sum(seconds) < wall  # the timed steps are part of the run, not more
    assert result["achieved_tflops"] == pytest.approx(result["flops_per_step"] / result["median_step_seconds"] / 1e12)
    assert result["achieved_tflops"] > 0
    assert result["mfu"] is None and result["peak_tflops"] is None and "pass --peak-tflops" in result["peak_source"]
    assert result["peak_memory_bytes"] > 0 and result["trainable_params"] > 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("[mfu] tiny server stage") and "MFU null" in line and str(tmp_path / "mfu.json") in line


def test_peak_override_gives_mfu(tmp_path, capsys):
    result, _ = run(tmp_path, "--peak-tflops", "0.25")
    assert result["peak_tflops"] == 0.25 and result["peak_source"] == "--peak-tflops"
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 0.25)
    assert f"MFU {result['mfu']:.3f}" in capsys.readouterr().out


def test_timing_excludes_warmup_and_measures_each_step(monkeypatch):
    # A clock that only the steps move, each by its own duration: the measured seconds are then
    # exact, whatever else the machine is doing (a real sleep stretches under load).
    durations = [0.3, 0.02, 0.05, 0.07]  # the first (warm-up) call is slow
    clock = {"now": 100.0, "calls": 0}

    def step() -> None:
        clock["now"] += durations[clock["calls"]]
        clock["calls"] += 1

    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: clock["now"]))
    seconds = time_steps(step, torch.device("cpu"), warmup=1, steps=3)
    assert clock["calls"] == 4
    assert seconds == pytest.approx(durations[1:])


def test_peak_table():
    bf16 = torch.bfloat16
    assert table_peak("NVIDIA H100 PCIe", bf16) == (756.5, "H100 PCIe")
    assert table_peak("NVIDIA H100 80GB HBM3", bf16)[0] == 989.5
    assert table_peak("NVIDIA H200", bf16)[0] == 989.5
    assert table_peak("NVIDIA A100-SXM4-80GB", bf16)[0] == 312.0
    assert table_peak("NVIDIA GeForce RTX 4090", bf16)[0] == 165.2
    assert table_peak("NVIDIA L40S", bf16)[0] == 362.05
    assert table_peak("NVIDIA H100 80GB HBM3", torch.float32) is None  # the table holds bf16 peaks
    assert table_peak("Some Other Accelerator", bf16) is None


@pytest.mark.parametrize("argv, message", [
    (["--layers", "0"], "--layers: 0 must be >= 1"),
    (["--model", "tiny", "--layers", "8"], "--layers: 8 is out of range"),
    (["--dtype", "float16"], "argument --dtype: invalid choice"),
    (["--steps", "x"], "argument --steps: invalid int value"),
    (["--peak-tflops", "0"], "--peak-tflops: 0.0 must be > 0"),
    (["--model", "tiny", "--seq", "4096"], "--seq: 4096 exceeds"),
    (["--model", "tiny", "--targets", "q_proj,c_attn"], "--targets: lora.target_modules: 'c_attn' matches no module"),
    (["--model", "tiny", "--targets", ","], "--targets: lora.target_modules: empty"),
])
def test_bad_values_are_one_line_errors(tmp_path, capsys, argv, message):
    assert main([*argv, "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("splitlora_ds.bench.mfu: error: ") and message in err[0]
    assert not (tmp_path / "mfu.json").exists()
