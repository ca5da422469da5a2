"""The benchmark: every mode of one recipe, its table, JSON and plots (on a tiny recipe)."""

import json
import subprocess
import sys

import pytest

from _launch import ROOT, rank_env, write_recipe
from splitlora_ds.bench.__main__ import main
from splitlora_ds.bench.report import time_to_target
from splitlora_ds.bench.runs import ModeResult


@pytest.mark.launcher
def test_bench_runs_every_mode_and_writes_its_outputs(tmp_path):
    recipe = write_recipe(tmp_path, federation={"clients": 2, "aggregate_every": 2},
                          data={"num_samples": 48, "validation_fraction": 0.25}, eval={"every": 2},
                          train={"max_steps": 4, "batch_size": 2})
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "splitlora_ds.bench", "--recipe", str(recipe), "--out", str(out),
                           "--devices", str(ROOT / "devices" / "edge-mix.yaml"), "--threads", "1"],
                          cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    modes = {m["mode"]: m for m in results["modes"]}
    assert list(modes) == ["centralized", "split", "fedlora", "sequential"]
    assert results["target_loss"] == pytest.approx(modes["centralized"]["final_loss"] * 1.02)

    for m in modes.values():  # evaluation at the same amount of data in every mode: rounds 2 and 4
        assert [p["round"] for p in m["curve"]] == [2, 4]
        assert m["final_loss"] > 0 and m["step_seconds"] > 0 and m["tokens_per_s"] > 0
        assert m["simulated"]["round_s"] > 0
    assert [p["step"] for p in modes["sequential"]["curve"]] == [4, 8]  # 2 clients, one per step

    whole = modes["centralized"]["server"]["trainable_params"]
    split, fed = modes["split"], modes["fedlora"]
    assert split["client"]["trainable_params"] + split["server"]["trainable_params"] == whole
    assert fed["client"]["trainable_params"] == whole and fed["server"] is None
    # fedlora moves only adapters: one upload per averaging (steps 2 and 4 of 4), fp32.
    assert fed["client"]["bytes_sent_per_step"] == pytest.approx(whole * 4 * 2 / 4)
    assert all(p["bytes"] == 0 for p in modes["centralized"]["curve"])
    assert split["client"]["bytes_sent_per_step"] > fed["client"]["bytes_sent_per_step"]  # activations every step
    # Measured FLOPs: the split client + server do the centralized model's work (up to padding).
    both = split["client"]["flops_per_step"] * 2 + split["server"]["flops_per_step"]
    assert 0.7 < both / modes["centralized"]["server"]["flops_per_step"] < 1.3
    assert split["client"]["flops_per_step"] < fed["client"]["flops_per_step"]

    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in modes) and "sim. to target" in table
    for png in ("loss_vs_time.png", "loss_vs_bytes.png", "loss_vs_simulated_time.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_needs_validation_data(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["--recipe", str(recipe), "--out", str(tmp_path / "b")]) == 2
    assert "set data.validation or data.validation_fraction" in capsys.readouterr().err
    assert main(["--recipe", str(recipe), "--out", str(tmp_path / "b"), "--modes", "split,pipeline"]) == 2
    assert "unknown mode(s) ['pipeline']" in capsys.readouterr().err


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    r = ModeResult("split", 2, 1, 0, 0, 0, 0, curve=[
        {"step": 2, "round": 2, "seconds": 1.5, "bytes": 0, "loss": 3.0},
        {"step": 4, "round": 4, "seconds": 3.0, "bytes": 0, "loss": 2.0},
        {"step": 6, "round": 6, "seconds": 4.5, "bytes": 0, "loss": 1.9}])
    time_to_target(r, 2.0)
    assert (r.time_to_target_s, r.rounds_to_target) == (3.0, 4)
    time_to_target(r, 1.0)
    assert r.time_to_target_s is None and r.rounds_to_target is None


def test_a_mode_that_runs_past_the_timeout_is_reported_not_raised(tmp_path, capsys):
    recipe = write_recipe(tmp_path, data={"num_samples": 48, "validation_fraction": 0.25})
    out = tmp_path / "b"
    assert main(["--recipe", str(recipe), "--out", str(out), "--modes", "centralized", "--timeout", "0.5"]) == 1
    assert "centralized failed (exit 124)" in capsys.readouterr().err
    assert "ran past --timeout 0.5 s" in (out / "centralized" / "log.txt").read_text()


def test_client_traffic_comes_from_gathered_summaries_when_its_run_stayed_on_its_host(tmp_path):
    """A multi-host run with log.gather: the main host has every role's summary.json but only its
    own TensorBoard runs; the bytes curve then spreads each client's total evenly over the steps."""
    import json as json_

    from splitlora_ds.bench.runs import ModeRun, collect
    from splitlora_ds.config import RunConfig
    from splitlora_ds.metrics import MetricsWriter

    cfg = RunConfig()  # split, 2 clients, 1 server stage
    log = tmp_path / "tb"
    writer = MetricsWriter(str(log), "server0")
    for step in range(4):
        writer.scalars(step, {"time/step_s": 0.5, **({"eval/loss": 3.0 - step} if step % 2 else {})})
    writer.close()
    for role, sent in (("client0", 300), ("client1", 100), ("server0", 0)):
        (log / role).mkdir(parents=True, exist_ok=True)
        summary = {"steps": 4, "active_steps": 4, "train_seconds": 2.0, "compute_seconds": 1.0, "tokens": 80,
                   "flops_per_step": 10, "positions": 40, "params": 5, "trainable_params": 2, "bytes_sent": sent,
                   "bytes_received": sent, "peak_rss_bytes": 1, "rss_before_model_bytes": 1,
                   "cuda_max_allocated_bytes": 0}
        (log / role / "summary.json").write_text(json_.dumps(summary))
    result = collect(cfg, ModeRun("split", str(log), command=[], wall_seconds=1.0))
    assert [p["step"] for p in result.curve] == [2, 4]
    assert [p["bytes"] for p in result.curve] == [400.0, 800.0]  # (600 + 200) bytes over 4 steps


def test_standard_and_u_shaped_variants():
    from splitlora_ds.bench.variants import VARIANTS, variant_overrides
    from splitlora_ds.config import load_config

    recipe = str(ROOT / "recipes" / "tiny-cpu.yaml")  # sets no split.client_tail_layers
    assert {"split-standard", "split-u-shaped"} <= set(VARIANTS)
    assert variant_overrides("split-u-shaped", recipe, []) == ["mode=split", "split.client_tail_layers=0"]
    # the recipe's (here: the user's --set) tail wins over the head-only default
    tail = ["split.client_tail_layers=1"]
    assert variant_overrides("split-u-shaped", recipe, tail) == ["mode=split", "split.client_tail_layers=1"]
    # the bench applies a variant's overrides after the user's: split-standard undoes a U-shaped recipe
    standard = load_config(recipe, [*tail, *variant_overrides("split-standard", recipe, tail)])
    assert standard.mode == "split" and standard.split.client_tail_layers is None
    u = load_config(recipe, ["mode=sequential", *variant_overrides("split-u-shaped", recipe, ["mode=sequential"])])
    assert u.mode == "split" and u.split.client_tail_layers == 0


def test_dp_variants_turn_tail_gradient_dp_off_where_they_measure_something_else():
    from splitlora_ds.bench.variants import variant_overrides
    from splitlora_ds.config import load_config

    recipe = str(ROOT / "recipes" / "tiny-cpu-dp.yaml")
    tail = ["split.client_tail_layers=0", "privacy.tail_gradient_clip=0.5", "privacy.tail_gradient_noise=1.0"]
    for name in ("split-no-dp", "split-dp-activations", "split-dp-updates", "split-standard"):
        privacy = load_config(recipe, [*tail, *variant_overrides(name, recipe, tail)]).privacy
        assert (privacy.tail_gradient_clip, privacy.tail_gradient_noise) == (None, 0.0), name
    assert load_config(recipe, [*tail, *variant_overrides("split-dp-activations", recipe, tail)]).privacy.activation_clip
    privacy = load_config(recipe, [*tail, *variant_overrides("split-u-shaped", recipe, tail)]).privacy
    assert privacy.tail_gradient_clip == 0.5


def test_table_reports_each_clients_bytes_per_step_sent_received_and_both():
    from splitlora_ds.bench.report import markdown

    meta = {"recipe": "r.yaml", "target_loss": 2.0, "target_from": "--target-loss", "threads": 1}
    runs = [ModeResult("split-standard", 2, 1, 0, 0, 0.1, 100, client={"bytes_sent_per_step": 1500,
                                                                        "bytes_received_per_step": 2500}),
            ModeResult("split-u-shaped", 2, 1, 0, 0, 0.1, 100, client={"bytes_sent_per_step": 3000,
                                                                        "bytes_received_per_step": 5500}),
            ModeResult("centralized", 1, 1, 0, 0, 0.1, 100)]
    table = markdown(meta, runs)
    assert "KB/step per client sent / recv / total" in table
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert rows["split-standard"].endswith("| 1.5 / 2.5 / 4.0 |")
    assert rows["split-u-shaped"].endswith("| 3.0 / 5.5 / 8.5 |")
    assert rows["centralized"].endswith("| - / - / - |")


def test_a_run_with_logical_clients_maps_rank_summaries_to_participants_and_its_sampled_rounds(tmp_path):
    """4 clients on 2 client ranks, 3 sampled per round, I = 2, max_steps = 4 (seed 42: rounds
    {0, 2, 3} and {0, 1, 2}): the bench reads the 2 ranks' summaries, counts rounds in local
    steps, and hands the latency model every participant's work and each round's sampled set."""
    import json as json_

    from splitlora_ds.bench.latency import Device, Profile, simulate
    from splitlora_ds.bench.runs import ModeRun, collect
    from splitlora_ds.config import load_config
    from splitlora_ds.metrics import MetricsWriter

    cfg = load_config(None, ["federation.clients=4", "federation.client_ranks=2", "federation.clients_per_round=3",
                             "federation.aggregate_every=2", "train.max_steps=4", "train.seed=42"])
    log = tmp_path / "tb"
    writer = MetricsWriter(str(log), "server0")
    for step in range(8):  # 2 rounds of 2 slots (ranks run 2 and 1 participants) of 2 steps
        writer.scalars(step, {"time/step_s": 0.5, **({"eval/loss": 3.0 - step / 8} if step in (3, 7) else {})})
    writer.close()

    def summary(active: int, flops: float, sent: int) -> dict:
        return {"steps": 8, "active_steps": active, "train_seconds": 4.0, "compute_seconds": 2.0, "tokens": 80,
                "flops_per_step": flops, "positions": 40, "params": 5, "trainable_params": 2, "bytes_sent": sent,
                "bytes_received": 0, "peak_rss_bytes": 1, "rss_before_model_bytes": 1, "cuda_max_allocated_bytes": 0}

    # rank 0 ran 2 participants per round (8 local steps), rank 1 one (4); 12 = K x max_steps.
    # The server: 30 FLOPs per participant step, so 60 in a slot of 2 ranks, 30 in one of 1: 45 per step.
    for role, s in (("client0", summary(8, 10, 800)), ("client1", summary(4, 12, 800)), ("server0", summary(8, 45, 0))):
        (log / role).mkdir(parents=True, exist_ok=True)
        (log / role / "summary.json").write_text(json_.dumps(s))
    result = collect(cfg, ModeRun("split", str(log), command=[], wall_seconds=1.0))

    assert [p["round"] for p in result.curve] == [2, 4]  # local steps of the completed rounds, not slots (4, 8)
    assert result.sampling.sampled == ((0, 2, 3), (0, 1, 2)) and result.sampling.steps == (2, 2)
    work = result.round_work
    assert work.clients == 4 and work.per_client_flops == ()  # per rank figures are no client's own
    assert work.client_flops == pytest.approx(11)  # the ranks' mean per active step
    assert work.bytes_up == pytest.approx((100 + 200) / 2)  # bytes per active step, mean over ranks
    assert work.server_flops == pytest.approx(4 * 30)  # per participant step x N clients

    # 1 FLOP/s devices, client 3 at half speed, infinite links: round 0 samples client 3 (22 s),
    # round 1 does not (11 s); the server serves 3 of 4 clients: 90 s. Messages cost nothing here.
    one = Device("one", tflops=1e-12)
    profile = Profile(server=one, clients=[one, one, one, Device("half", tflops=0.5e-12)])
    (sim,) = simulate([work], [result.curve[0]["round"]], profile, [result.sampling])
    assert sim["round_s"] == pytest.approx(((22 + 90) + (11 + 90)) / 2)
    assert sim["to_target_s"] == pytest.approx(2 * (22 + 90))  # the target fell in round 0
