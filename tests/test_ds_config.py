"""The ds_config is checked strictly before the run: unknown keys and optimizer/scheduler values
DeepSpeed would only refuse at deepspeed.initialize end with one ConfigError naming the key."""

import copy
import json
from pathlib import Path
from typing import Callable

import pytest

from _launch import ROOT, run_single, write_recipe
from splitlora_ds.ds_config import load_ds_config
from splitlora_ds.ds_config_schema import _DS_ADAM_PARAMS, _ReadTracker
from splitlora_ds.errors import ConfigError
from splitlora_ds.train import main

SHIPPED = sorted((ROOT / "ds_configs").glob("*.json"))
BASE = {
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                              "weight_decay": 0.01, "torch_adam": True}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-3,
                                                      "warmup_num_steps": 10, "warmup_type": "linear"}},
    "gradient_clipping": 1.0,
}


def write_ds(tmp_path: Path, cfg: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def edited(edit: Callable[[dict], None]) -> dict:
    cfg = copy.deepcopy(BASE)
    edit(cfg)
    return cfg


def opt_params(**values) -> Callable[[dict], None]:
    return lambda cfg: cfg["optimizer"]["params"].update(values)


def sched_params(**values) -> Callable[[dict], None]:
    return lambda cfg: cfg["scheduler"]["params"].update(values)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_ds_configs_validate_unchanged(path):
    assert load_ds_config(str(path)) == json.loads(path.read_text())


GOOD = {
    "base": lambda cfg: None,
    "adam-lowercase-fused-params": lambda cfg: cfg.update(
        optimizer={"type": "adam", "params": {"lr": 1e-3, "bias_correction": True, "adam_w_mode": False,
                                              "torch_adam": False}}),
    "sgd-nesterov": lambda cfg: cfg.update(
        optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "nesterov": True}}),
    "torch-rmsprop": lambda cfg: cfg.update(optimizer={"type": "RMSprop", "params": {"lr": 0.01, "alpha": 0.9}}),
    "adagrad": lambda cfg: cfg.update(optimizer={"type": "Adagrad", "params": {"lr": 0.01, "lr_decay": 0.0}}),
    "lamb": lambda cfg: cfg.update(optimizer={"type": "Lamb", "params": {"lr": 1e-3, "max_coeff": 10.0}}),
    "no-scheduler": lambda cfg: cfg.pop("scheduler"),
    "warmup-lr": lambda cfg: cfg.update(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 5}}),
    "warmup-cosine-total-filled-by-trainer": lambda cfg: cfg.update(
        scheduler={"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5, "cos_min_ratio": 0.1}}),
    "one-cycle": lambda cfg: cfg.update(
        scheduler={"type": "OneCycle", "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3,
                                                  "cycle_first_step_size": 100}}),
    "deepspeed-sections": lambda cfg: cfg.update(
        bf16={"enabled": True}, zero_optimization={"stage": 0}, steps_per_print=100, wall_clock_breakdown=False,
        tensorboard={"enabled": False, "output_path": "tb"}, prescale_gradients=False),
}


@pytest.mark.parametrize("name", GOOD)
def test_good_configs_pass(tmp_path, name):
    cfg = edited(GOOD[name])
    assert load_ds_config(write_ds(tmp_path, cfg)) == cfg


BAD = [
    # unknown keys, top level and nested, with the closest known name
    (lambda cfg: cfg.update(gradient_clippin=1.0),
     "unknown key 'gradient_clippin'; did you mean 'gradient_clipping'?"),
    (lambda cfg: cfg.update(zero_optimization={"stagee": 0}),
     "unknown key 'zero_optimization.stagee'; did you mean 'zero_optimization.stage'?"),
    (lambda cfg: cfg.update(bf16={"enabld": True}), "unknown key 'bf16.enabld'; did you mean 'bf16.enabled'?"),
    (lambda cfg: cfg["optimizer"].update(param={}), "optimizer: unknown key 'param'; did you mean 'params'?"),
    (lambda cfg: cfg["scheduler"].update(parms={}), "scheduler: unknown key 'parms'; did you mean 'params'?"),
    (lambda cfg: cfg.update(nebula={"enabled": True}), "Nebula checkpointing has been removed"),
    (lambda cfg: cfg.update(bf16={"enabled": "maybe"}), 'bf16.enabled: "maybe" is invalid'),
    (lambda cfg: cfg.update(gradient_clipping=-1.0), "gradient_clipping: -1.0 is invalid; it must be a number >= 0"),
    # optimizer
    (opt_params(lr=-1), "optimizer.params.lr: -1 is invalid; it must be >= 0"),
    (opt_params(lr="1e-3"), 'optimizer.params.lr: "1e-3" is invalid; it must be a number >= 0'),
    (opt_params(betas=[0.9, 1.0]), "optimizer.params.betas: [0.9, 1.0] is invalid; it must be two numbers in [0, 1)"),
    (opt_params(betas=[-0.1, 0.9]), "optimizer.params.betas: [-0.1, 0.9] is invalid"),
    (opt_params(eps=-1e-8), "optimizer.params.eps: -1e-08 is invalid; it must be >= 0"),
    (opt_params(weight_decay=-0.01), "optimizer.params.weight_decay: -0.01 is invalid; it must be >= 0"),
    (opt_params(weight_decy=0.01), "optimizer.params: unknown key 'weight_decy' for AdamW (built as "
                                   "torch.optim.AdamW); did you mean 'weight_decay'?"),
    (opt_params(bias_correction=False), "optimizer.params: unknown key 'bias_correction' for AdamW"),  # FusedAdam's
    (lambda cfg: cfg.update(optimizer={"type": "AdamW", "params": {"lr": 1e-3, "bias_correction": True}}),
     "optimizer.params: unknown key 'bias_correction' for AdamW"),  # unset torch_adam means torch's AdamW
    (opt_params(max_grad_norm=1.0), "optimizer.params.max_grad_norm: not an optimizer parameter in DeepSpeed; "
                                    "use the top-level 'gradient_clipping'"),
    (lambda cfg: cfg["optimizer"].update(type="AdamX"), "optimizer.type: unknown optimizer 'AdamX'; did you mean"),
    (lambda cfg: cfg.update(optimizer={"type": "sgd", "params": {"lr": 0.1}}),
     "optimizer.type: unknown optimizer 'sgd'; did you mean 'SGD'?"),  # DeepSpeed looks torch's names up as written
    (lambda cfg: cfg.update(optimizer={"type": "SGD", "params": {"lr": 0.1, "momentum": -0.9}}),
     "optimizer.params.momentum: -0.9 is invalid; it must be >= 0"),
    (lambda cfg: cfg.update(optimizer={"type": "SGD", "params": {"lr": 0.1, "nesterov": True}}),
     "optimizer.params.nesterov: true is invalid (torch.optim.SGD: Nesterov momentum requires a momentum"),
    (lambda cfg: cfg.update(optimizer={"type": "SGD", "params": {"lr": 0.1, "torch_adam": True}}),
     "optimizer.params: unknown key 'torch_adam' for SGD"),
    (lambda cfg: cfg.update(optimizer={"type": "RMSprop", "params": {"alpha": -1.0}}),
     "optimizer.params.alpha: -1.0 is invalid (torch.optim.RMSprop: Invalid alpha value: -1.0)"),
    (lambda cfg: cfg.update(optimizer={"type": "Muon"}), "optimizer.type: 'Muon' needs every parameter tagged"),
    # scheduler
    (lambda cfg: cfg["scheduler"].update(type="WarmupDecay"),
     "scheduler.type: unknown scheduler 'WarmupDecay'; did you mean 'WarmupDecayLR'?"),
    (lambda cfg: cfg["scheduler"].update(type="CosineAnnealingLR"), "scheduler.type: unknown scheduler"),
    (sched_params(warmup_max_l=1e-3),
     "scheduler.params: unknown key 'warmup_max_l' for WarmupDecayLR; did you mean 'warmup_max_lr'?"),
    (sched_params(cos_min_ratio=0.1), "scheduler.params: unknown key 'cos_min_ratio' for WarmupDecayLR"),
    (sched_params(warmup_num_steps=-1), "scheduler.params.warmup_num_steps: -1 is invalid; it must be an integer >= 0"),
    (sched_params(warmup_num_steps=0),
     "scheduler.params.warmup_num_steps: 0 is invalid (WarmupDecayLR: warmup_num_steps must be a positive integer"),
    (sched_params(warmup_num_steps=2.5), "scheduler.params.warmup_num_steps: 2.5 is invalid"),
    (sched_params(total_num_steps=-10), "scheduler.params.total_num_steps: -10 is invalid"),
    (sched_params(warmup_max_lr=-1e-3), "scheduler.params.warmup_max_lr: -0.001 is invalid; it must be a number >= 0"),
    (sched_params(warmup_type="cosine"), "scheduler.params.warmup_type: \"cosine\" is invalid; it must be 'log' or 'linear'"),
    (lambda cfg: cfg.update(scheduler={"type": "OneCycle", "params": {"cycle_max_lr": 1e-3}}),
     "scheduler.params: OneCycle needs 'cycle_min_lr'"),
]


@pytest.mark.parametrize("edit,message", BAD, ids=[m.split(":")[0] + f"-{i}" for i, (_, m) in enumerate(BAD)])
def test_bad_values_name_the_key(tmp_path, edit, message):
    path = write_ds(tmp_path, edited(edit))
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    text = str(e.value)
    assert text.startswith(f"deepspeed_config: {path}: ")
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("cfg,message", [
    ({**BASE, "train_batch_size": 8}, "sets 'train_batch_size'; the trainer derives batch sizes"),
    ({"gradient_clipping": 1.0}, "has no optimizer.type (e.g. AdamW or SGD)"),
    ({**BASE, "fp16": {"enabled": True}}, "enables fp16; dynamic loss scaling does not carry across the split"),
    ({**BASE, "zero_optimization": {"stage": 2}}, "sets zero_optimization.stage=2; every rank is its own"),
    ([BASE], "must hold a JSON object, not list"),
])
def test_the_split_engine_checks_stay(tmp_path, cfg, message):
    path = write_ds(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        load_ds_config(path)
    assert f"deepspeed_config: {path} " in str(e.value) and message in str(e.value)


def test_known_keys_are_the_ones_deepspeed_reads():
    """No key list is kept: the known top-level keys are those DeepSpeedConfig looks up. Guard
    that the lookups are seen (a change in how DeepSpeed reads its dict would show up here)."""
    from deepspeed.runtime import constants
    from deepspeed.runtime.config import DeepSpeedConfig

    tracker = _ReadTracker({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    DeepSpeedConfig(tracker)
    expected = {constants.OPTIMIZER, constants.SCHEDULER, constants.GRADIENT_CLIPPING, constants.STEPS_PER_PRINT,
                constants.WALL_CLOCK_BREAKDOWN, constants.BFLOAT16, constants.FP16, constants.PRESCALE_GRADIENTS,
                "zero_optimization"}
    assert expected <= tracker.seen


def test_dry_run_validates_the_ds_config(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ds = write_ds(tmp_path, edited(opt_params(lr=-1)))
    recipe = write_recipe(tmp_path, deepspeed_config=ds, mode="centralized")
    assert main(["--recipe", str(recipe), "--dry-run"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"splitlora_ds: error: deepspeed_config: {ds}: optimizer.params.lr: -1 is invalid; it must be >= 0")


def test_a_bad_ds_config_ends_the_run_with_one_line(tmp_path):
    ds = write_ds(tmp_path, edited(lambda cfg: cfg.update(gradient_clippin=1.0)))
    recipe = write_recipe(tmp_path, deepspeed_config=ds)
    proc = run_single(["--recipe", str(recipe), "--set", "mode=centralized"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("splitlora_ds: error: ")]
    assert errors == [f"splitlora_ds: error: deepspeed_config: {ds}: unknown key 'gradient_clippin'; "
                      "did you mean 'gradient_clipping'?"]
    assert "Traceback" not in proc.stderr + proc.stdout



def test_deepspeed_own_adam_params_are_the_ones_its_engine_pops():
    """torch_adam, adam_w_mode and fp32_optimizer_states are accepted for Adam/AdamW because
    DeepSpeed's engine takes them out before building the optimizer: check that it still does."""
    import inspect

    from deepspeed.runtime.config import ADAM_W_MODE, TORCH_ADAM_PARAM
    from deepspeed.runtime.engine import DeepSpeedEngine

    source = (inspect.getsource(DeepSpeedEngine.get_optimizer_configuration)
              + inspect.getsource(DeepSpeedEngine._configure_basic_optimizer))
    assert _DS_ADAM_PARAMS == (TORCH_ADAM_PARAM, ADAM_W_MODE, "fp32_optimizer_states")
    for popped in ("pop(TORCH_ADAM_PARAM", "pop(ADAM_W_MODE", "pop('fp32_optimizer_states'"):
        assert popped in source


def test_adam_runs_as_torch_unless_fused_is_asked_for():
    from splitlora_ds.ds_config import role_ds_config

    base = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    assert role_ds_config(base, 4, 10)["optimizer"]["params"]["torch_adam"] is True
    fused = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": False}}}
    assert role_ds_config(fused, 4, 10)["optimizer"]["params"]["torch_adam"] is False


def test_the_engine_clips_only_when_the_config_asks_and_the_trainer_does_not():
    """DeepSpeed's own default is to clip at 1.0; an absent key means no clipping here, and a
    trainer that clips by the global norm leaves the engines nothing to clip."""
    from splitlora_ds.ds_config import role_ds_config

    base = {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}}
    assert role_ds_config(base, 4, 10)["gradient_clipping"] == 0.0
    assert role_ds_config({**base, "gradient_clipping": 5.0}, 4, 10)["gradient_clipping"] == 5.0
    assert role_ds_config({**base, "gradient_clipping": 5.0}, 4, 10, clips_itself=False)["gradient_clipping"] == 0.0


def test_fused_adam_without_cuda_is_refused_before_the_run(monkeypatch):
    from splitlora_ds.ds_config import check_fused_adam

    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    check_fused_adam({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, "x.json")  # torch's: fine
    with pytest.raises(ConfigError, match=r"optimizer.params.torch_adam: false in x.json asks for DeepSpeed's FusedAdam"):
        check_fused_adam({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": False}}}, "x.json")


def test_fused_adam_on_cuda_needs_a_prebuilt_op_or_nvcc(monkeypatch):
    from deepspeed.git_version_info import installed_ops

    from splitlora_ds.ds_config import check_fused_adam

    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setitem(installed_ops, "fused_adam", False)
    monkeypatch.setattr("shutil.which", lambda name: None)
    monkeypatch.setenv("CUDA_HOME", "/no/cuda")
    fused = {"optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": False}}}
    with pytest.raises(ConfigError, match="no CUDA toolkit"):
        check_fused_adam(fused, "x.json")
    monkeypatch.setitem(installed_ops, "fused_adam", True)
    check_fused_adam(fused, "x.json")  # prebuilt into DeepSpeed: nothing to compile
