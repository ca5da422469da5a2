"""Every mode on CUDA: GPT-2 with q/v-only LoRA and LLaMA in bf16 train; split equals
centralized in fp32; FedAvg in bf16 averages the fp32 masters; summaries and the benchmark
report CUDA memory. One GPU is enough: ranks share it over gloo."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from _launch import ROOT, check, launch, rank_env, run_single, scalars, write_recipe
from splitlora_ds.metrics import read_scalars
from splitlora_ds.run_summary import read_summary

GPU = {"dist": {"timeout_s": 120, "backend": "gloo"}}


def ds_config(tmp_path, bf16: bool, optimizer="AdamW", lr=5e-3):
    cfg = {"optimizer": {"type": optimizer, "params": {"lr": lr}}}
    if bf16:
        cfg["bf16"] = {"enabled": True}
    path = tmp_path / f"ds-{optimizer}-{'bf16' if bf16 else 'fp32'}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def run(tmp_path, mode, family, ranks, **sections):
    recipe = write_recipe(tmp_path, family, mode=mode, **GPU, **sections)
    check(run_single(["--recipe", str(recipe)]) if mode == "centralized" else launch(ranks, ["--recipe", str(recipe)]))
    return tmp_path / "tb"


@pytest.mark.parametrize("family,lora", [("gpt2", {"fused_qkv": ["q", "v"], "target_modules": ["c_attn"]}),
                                         ("llama", {})])
@pytest.mark.parametrize("mode,ranks,main,tail", [("centralized", 1, "centralized", None), ("fedlora", 2, "client0", None),
                                                  ("split", 3, "server0", None), ("split", 3, "client0", 1)],
                         ids=["centralized", "fedlora", "split", "u-shaped"])
def test_every_mode_trains_in_bf16_on_cuda(tmp_path, family, lora, mode, ranks, main, tail):
    tb = run(tmp_path, mode, family, ranks, deepspeed_config=ds_config(tmp_path, bf16=True),
             lora={"rank": 4, "alpha": 8, "dropout": 0.0, **lora}, federation={"clients": 2, "aggregate_every": 2},
             split={"client_layers": 2, "client_tail_layers": tail},
             train={"max_steps": 12, "batch_size": 4, "seed": 7})
    curve = scalars(tb / main)
    assert len(curve) == 12 and sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, curve
    summary = read_summary(str(tb / main))
    assert summary["cuda_max_allocated_bytes"] > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tail", [None, 1], ids=["standard", "u-shaped"])
def test_split_equals_centralized_in_fp32_on_cuda(tmp_path, family, tail):
    sgd = ds_config(tmp_path, bf16=False, optimizer="SGD", lr=0.05)
    outs = {}
    for mode, ranks in (("centralized", 1), ("split", 2)):
        out = tmp_path / mode / "out"
        tb = run(tmp_path / mode, mode, family, ranks, deepspeed_config=sgd, train={"output_dir": str(out)},
                 split={"client_layers": 2, "client_tail_layers": tail if mode == "split" else None})
        main = "centralized" if mode == "centralized" else ("server0" if tail is None else "client0")
        outs[mode] = (scalars(tb / main), out)
    (ref, ref_out), (split, split_out) = outs["centralized"], outs["split"]
    assert max(abs(a - b) for a, b in zip(ref, split)) <= 1e-5
    ref_adapters = load_file(str(ref_out / "centralized.safetensors"))
    split_adapters = {**load_file(str(split_out / "client0.safetensors")),
                      **load_file(str(split_out / "server0.safetensors"))}
    assert max((ref_adapters[k] - split_adapters[k]).abs().max().item() for k in ref_adapters) <= 1e-5


def test_bf16_fedavg_averages_the_fp32_masters(tmp_path):
    recipe = write_recipe(tmp_path, **GPU, deepspeed_config=ds_config(tmp_path, bf16=True),
                          federation={"clients": 2, "aggregate_every": 2}, train={"max_steps": 4, "seed": 7},
                          data={"num_samples": 40})
    check(launch(3, ["--recipe", str(recipe), "--out", str(tmp_path), "--masters"],
                 script=str(ROOT / "tests" / "scripts" / "record_adapters.py")))
    snaps = [load_file(str(tmp_path / f"client{c}.safetensors")) for c in range(2)]
    counts = [read_scalars(str(tmp_path / "tb" / f"client{c}"), f"client{c}/samples")[0][1] for c in range(2)]
    weights = [n / sum(counts) for n in counts]
    names = [k.split("/", 3)[3] for k in snaps[0] if k.startswith("1/avg/master/")]
    assert names
    moved_below_bf16 = False
    for name in names:
        before = [s[f"1/opt/master/{name}"] for s in snaps]
        expected = sum(w * b for w, b in zip(weights, before))
        for s in snaps:
            master, param = s[f"1/avg/master/{name}"], s[f"1/avg/{name}"]
            torch.testing.assert_close(master, expected, atol=1e-7, rtol=0)  # fp32 arithmetic, no bf16 rounding
            assert torch.equal(param, master.to(torch.bfloat16))  # the model holds the rounded masters
        moved_below_bf16 |= not torch.equal(expected, expected.to(torch.bfloat16).float())
    assert moved_below_bf16, "the averaged masters hold values bf16 cannot: the test can tell"


def test_bench_reports_cuda_memory(tmp_path):
    recipe = write_recipe(tmp_path, **GPU, deepspeed_config=ds_config(tmp_path, bf16=True),
                          federation={"clients": 2, "aggregate_every": 2},
                          data={"num_samples": 48, "validation_fraction": 0.25}, eval={"every": 2},
                          train={"max_steps": 4, "batch_size": 2})
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "splitlora_ds.bench", "--recipe", str(recipe), "--out", str(out),
                           "--modes", "centralized,split"], cwd=ROOT, env=rank_env(), capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    modes = {m["mode"]: m for m in json.loads((out / "results.json").read_text())["modes"]}
    assert modes["split"]["client"]["cuda_max_allocated_bytes"] > 0
    assert modes["split"]["server"]["cuda_max_allocated_bytes"] > 0
    assert modes["centralized"]["server"]["cuda_max_allocated_bytes"] > 0
    assert modes["split"]["server"]["compute_tokens_per_s"] > 0
