"""Strict checks of a ds_config against DeepSpeed's own parser, optimizers and LR schedulers.

DeepSpeed ignores keys it does not read and validates optimizer and scheduler arguments only
inside `deepspeed.initialize`, where a mistake is a traceback on some ranks and a hang on the
others. Everything here runs before any collective call and raises a one-line ConfigError.

No key list is typed in by hand: the known top-level keys are the ones DeepSpeed's config parser
looks up, the nested sections are DeepSpeed's pydantic models (which forbid extra keys), and the
optimizer and scheduler arguments are the constructor signatures of the classes DeepSpeed would
build. Values are checked by building those classes on a dummy parameter wherever that is cheap.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import json
from typing import Any, Callable, Mapping, Optional

import torch

from .errors import ConfigError

# Optimizer params DeepSpeed pops before calling the Adam class (engine.get_optimizer_configuration
# and _configure_basic_optimizer); its constants module names only the first two of them.
_DS_ADAM_PARAMS = ("torch_adam", "adam_w_mode", "fp32_optimizer_states")


def _where(path: str, key: str) -> str:
    return f"deepspeed_config: {path}: {key}"


def _show(value: Any) -> str:
    return json.dumps(value)  # the user wrote JSON: show true/null, not True/None


def _suggest(name: str, known: list[str]) -> str:
    hint = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean '{hint[0]}'?" if hint else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _invalid(path: str, key: str, value: Any, rule: str) -> ConfigError:
    return ConfigError(f"{_where(path, key)}: {_show(value)} is invalid; {rule}")


def _refuse_unknown(given: Any, known: Any, where: str, context: str = "") -> None:
    """Raise for the first (sorted) key of `given` not in `known`, with the closest known name."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key '{unknown[0]}'{context}{_suggest(unknown[0], sorted(known))}")


class _ReadTracker(dict):
    """A dict that records which keys are looked up, so that running DeepSpeed's own config
    parser over it tells which top-level keys DeepSpeed reads (there is no list to go stale)."""

    def __init__(self, data: Mapping, seen: Optional[set] = None):
        super().__init__(data)
        self.seen = set() if seen is None else seen

    def __getitem__(self, key):
        self.seen.add(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)

    def __contains__(self, key):
        self.seen.add(key)
        return super().__contains__(key)

    def keys(self):
        return _TrackedKeys(self)  # `KEY in param_dict.keys()` is DeepSpeed's usual test

    def __copy__(self):
        return _ReadTracker(self, self.seen)  # DeepSpeedConfig parses a shallow copy


class _TrackedKeys:
    def __init__(self, tracker: _ReadTracker):
        self._tracker = tracker

    def __contains__(self, key) -> bool:
        return key in self._tracker

    def __iter__(self):
        return iter(dict.keys(self._tracker))

    def __len__(self) -> int:
        return len(self._tracker)


def check_with_deepspeed_parser(cfg: dict, path: str) -> None:
    """Parse `cfg` with DeepSpeedConfig (its pydantic sections forbid unknown keys; it refuses
    removed features) and refuse top-level keys the parser never looked up."""
    from deepspeed.runtime.config import DeepSpeedConfig

    # The batch keys are the trainer's (role_ds_config); the parser needs them to be present.
    tracker = _ReadTracker({**cfg, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1})
    try:
        DeepSpeedConfig(tracker)
    except Exception as e:  # DeepSpeed raises pydantic, assertion, type and its own errors here
        raise ConfigError(f"deepspeed_config: {path}: {_deepspeed_error(e, cfg)}") from e
    _refuse_unknown(cfg, {k for k in tracker.seen if isinstance(k, str)}, f"deepspeed_config: {path}")


def _deepspeed_error(e: Exception, cfg: dict) -> str:
    """One line from DeepSpeed's error; pydantic errors name the key path inside the config."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return " ".join(str(e).split()) or type(e).__name__
    first = errors()[0]
    raw = [str(part) for part in first["loc"]]
    loc = _locate(cfg, raw)
    if first["type"] == "extra_forbidden":
        prefix = loc[:len(loc) - len(raw[-1])]  # the section the key sits in, as the user wrote it
        known = [prefix + name for name in _model_fields(getattr(e, "title", ""), raw[:-1])]
        return f"unknown key '{loc}'{_suggest(loc, known)}"
    return f"{loc}: {_show(first.get('input'))} is invalid; {first['msg']}"


def _locate(cfg: dict, loc: list[str]) -> str:
    """The dotted key path of a pydantic error location. DeepSpeed builds most models from one
    section, so the location is relative to that section: find the section that holds it."""
    def holds(section: Any, parts: list[str]) -> bool:
        for part in parts:
            if not isinstance(section, dict) or part not in section:
                return False
            section = section[part]
        return True

    if holds(cfg, loc):
        return ".".join(loc)
    owners = [k for k, v in cfg.items() if holds(v, loc)]
    return ".".join(([owners[0]] if len(owners) == 1 else []) + loc)


def _model_fields(title: str, inner: list[str]) -> list[str]:
    """Field names and aliases of DeepSpeed's pydantic config model called `title`, or of the
    model nested in it at the field path `inner`."""
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    from pydantic import BaseModel

    pending, model = [DeepSpeedConfigModel], None
    while pending and model is None:
        candidate = pending.pop()
        pending.extend(candidate.__subclasses__())
        model = candidate if candidate.__name__ == title else None
    for part in inner:
        field = model.model_fields.get(part) if model is not None else None
        nested = field.annotation if field is not None else None
        model = nested if isinstance(nested, type) and issubclass(nested, BaseModel) else None
    if model is None:
        return []
    return [n for name, info in model.model_fields.items() for n in [name] + ([info.alias] if info.alias else [])]


def check_gradient_clipping(cfg: dict, path: str) -> None:
    value = cfg.get("gradient_clipping", 0.0)
    if not _is_number(value) or value < 0:
        raise _invalid(path, "gradient_clipping", value, "it must be a number >= 0 (0 turns clipping off)")


def _dummy_parameters() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(1))]


def _signature_names(fn: Callable, skip: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """(all argument names, required ones) of `fn`, without `skip` and self; ([], []) when it
    takes **kwargs (then any name may be right)."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.name not in ("self", *skip)]
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return [], []
    return [p.name for p in params], [p.name for p in params if p.default is p.empty]


def _build_or_blame(build: Callable[[dict], Any], params: dict, where: str, owner: str) -> None:
    """Build the class with `params`; if it refuses, name the parameter it refuses on its own
    (or all of them together when only the combination is wrong)."""
    try:
        build(params)
        return
    except (ValueError, TypeError, RuntimeError) as whole:
        reason = whole
    for key, value in params.items():
        try:
            build({key: value})
        except (ValueError, TypeError, RuntimeError) as alone:
            raise ConfigError(f"{where}.{key}: {_show(value)} is invalid ({owner}: {alone})") from alone
    raise ConfigError(f"{where}: {_show(params)} is invalid ({owner}: {reason})") from reason


def _check_common_optimizer_values(params: dict, path: str) -> None:
    """Ranges every optimizer DeepSpeed builds shares, with a message that says the rule
    (torch's own errors, the fallback, only say 'Invalid')."""
    for key in ("lr", "eps", "weight_decay", "momentum"):
        if key in params and not _is_number(params[key]):
            raise _invalid(path, f"optimizer.params.{key}", params[key], "it must be a number >= 0")
        if key in params and params[key] < 0:
            raise _invalid(path, f"optimizer.params.{key}", params[key], "it must be >= 0")
    betas = params.get("betas", [0.0, 0.0])
    if not (isinstance(betas, list) and len(betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in betas)):
        raise _invalid(path, "optimizer.params.betas", betas, "it must be two numbers in [0, 1)")


def _class_label(cls: type) -> str:
    return f"torch.optim.{cls.__name__}" if cls.__module__.startswith("torch.optim") else cls.__name__


def _torch_optimizer_class(name: str) -> Optional[type]:
    """DeepSpeed builds any name that is not its own as getattr(torch.optim, name): case matters."""
    cls = getattr(torch.optim, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer) else None


def _known_optimizer_names() -> list[str]:
    from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

    torch_names = [n for n in dir(torch.optim) if _torch_optimizer_class(n) is not None]
    return sorted(set(DEEPSPEED_OPTIMIZERS) | set(torch_names))


def _adam_classes(name: str, params: dict) -> tuple[list[type], type]:
    """(classes DeepSpeed may build for Adam/AdamW with these params, torch class to check values).
    torch_adam true (or unset: role_ds_config defaults it to true) means torch's class; false
    means DeepSpeed's FusedAdam."""
    from deepspeed.ops.adam import FusedAdam

    adam_w = name == "adamw" or params.get("adam_w_mode", True)  # DeepSpeed's own rule
    torch_cls = torch.optim.AdamW if adam_w else torch.optim.Adam
    return ([torch_cls] if params.get("torch_adam", True) else [FusedAdam]), torch_cls


def _optimizer_classes(name: str, params: dict, path: str) -> tuple[list[type], Optional[type]]:
    """(classes whose constructor arguments are the accepted params, class to build on a dummy
    parameter to check values, or None where building needs a GPU kernel or a package)."""
    from deepspeed.runtime import config as ds

    lower = name.lower() if name.lower() in ds.DEEPSPEED_OPTIMIZERS else None  # DeepSpeed's own: any case
    if lower in (ds.ADAM_OPTIMIZER, ds.ADAMW_OPTIMIZER):
        return _adam_classes(lower, params)
    if lower == ds.ADAGRAD_OPTIMIZER:
        return [torch.optim.Adagrad], torch.optim.Adagrad  # no ZeRO offload here, so torch's
    if lower == ds.LAMB_OPTIMIZER:
        from deepspeed.ops.lamb import FusedLamb
        return [FusedLamb], None
    if lower == ds.LION_OPTIMIZER:
        from deepspeed.ops.lion import FusedLion
        return [FusedLion], None
    if lower in (ds.MUADAM_OPTIMIZER, ds.MUADAMW_OPTIMIZER, ds.MUSGD_OPTIMIZER):
        if importlib.util.find_spec("mup") is None:
            raise ConfigError(f"{_where(path, 'optimizer.type')}: '{name}' needs the mup package, "
                              "which is not installed")
        import mup
        cls = {ds.MUADAM_OPTIMIZER: mup.MuAdam, ds.MUADAMW_OPTIMIZER: mup.MuAdamW, ds.MUSGD_OPTIMIZER: mup.MuSGD}[lower]
        return [cls], cls
    if lower == ds.MUON_OPTIMIZER:
        raise ConfigError(f"{_where(path, 'optimizer.type')}: '{name}' needs every parameter tagged "
                          "use_muon, which the split engine does not do; use AdamW or SGD")
    cls = _torch_optimizer_class(name)
    if cls is None:
        known = _known_optimizer_names()
        hint = difflib.get_close_matches(name.lower(), [k.lower() for k in known], n=1)
        did_you_mean = f"; did you mean '{next(k for k in known if k.lower() == hint[0])}'?" if hint else ""
        raise ConfigError(f"{_where(path, 'optimizer.type')}: unknown optimizer '{name}'{did_you_mean} "
                          "(DeepSpeed's own, any case, or a torch.optim class name)")
    return [cls], cls


def check_optimizer(cfg: dict, path: str) -> None:
    """optimizer.type names a class DeepSpeed builds; optimizer.params are its constructor's
    arguments (or ones DeepSpeed takes itself) with values that class accepts."""
    from deepspeed.runtime import constants as ds

    opt = cfg[ds.OPTIMIZER]
    if not isinstance(opt, dict) or not isinstance(opt.get(ds.TYPE), str):
        raise _invalid(path, "optimizer", opt, "it must be a mapping with a 'type' name (e.g. AdamW or SGD)")
    _refuse_unknown(opt, (ds.TYPE, ds.OPTIMIZER_PARAMS, ds.LEGACY_FUSION), _where(path, "optimizer"))
    params = opt.get(ds.OPTIMIZER_PARAMS, {})
    if not isinstance(params, dict):
        raise _invalid(path, "optimizer.params", params, "it must be a mapping")
    if "max_grad_norm" in params:
        # DeepSpeed refuses it for every optimizer, at initialize.
        raise ConfigError(f"{_where(path, 'optimizer.params.max_grad_norm')}: not an optimizer parameter in "
                          "DeepSpeed; use the top-level 'gradient_clipping'")
    name = opt[ds.TYPE]
    classes, build_cls = _optimizer_classes(name, params, path)
    _refuse_unknown_optimizer_params(name, params, classes, path)
    _check_common_optimizer_values(params, path)
    if build_cls is not None:
        own, _ = _signature_names(build_cls.__init__, ("params",))
        values = {k: v for k, v in params.items() if k in own}
        _build_or_blame(lambda kw: build_cls(_dummy_parameters(), **kw), values,
                        _where(path, "optimizer.params"), _class_label(build_cls))


def _refuse_unknown_optimizer_params(name: str, params: dict, classes: list[type], path: str) -> None:
    accepted = set(_DS_ADAM_PARAMS) if name.lower() in ("adam", "adamw") else set()
    for cls in classes:
        names, _ = _signature_names(cls.__init__, ("params", "adam_w_mode"))  # DeepSpeed passes adam_w_mode
        if not names:
            return  # a **kwargs constructor: nothing to hold the names against
        accepted |= set(names)
    backends = " or ".join(_class_label(c) for c in classes)
    _refuse_unknown(params, accepted, _where(path, "optimizer.params"), f" for {name} (built as {backends})")


def _check_scheduler_value(key: str, value: Any, path: str) -> None:
    """Step counts and rates by DeepSpeed's naming of its scheduler arguments."""
    from deepspeed.runtime.lr_schedules import WARMUP_LINEAR_RATE, WARMUP_LOG_RATE

    where = f"scheduler.params.{key}"
    if key == "warmup_type" and value not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        # DeepSpeed would log a warning and silently warm up logarithmically.
        raise _invalid(path, where, value, f"it must be '{WARMUP_LOG_RATE}' or '{WARMUP_LINEAR_RATE}'")
    if key.endswith(("_steps", "_step_size", "_stair_count")) and value is not None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise _invalid(path, where, value, "it must be an integer >= 0")
    if key.endswith(("_lr", "_rate", "_ratio", "_mom")):
        values = value if isinstance(value, list) else [value]  # DeepSpeed takes per-group lists
        if not values or not all(_is_number(v) and v >= 0 for v in values):
            raise _invalid(path, where, value, "it must be a number >= 0")


def check_scheduler(cfg: dict, path: str, trainer_fills: Mapping[str, Any]) -> None:
    """`trainer_fills`: params the trainer sets itself when absent (role_ds_config)."""
    from deepspeed.runtime import constants as ds
    from deepspeed.runtime import lr_schedules

    sched = cfg.get(ds.SCHEDULER)
    if sched is None:
        return
    if not isinstance(sched, dict) or not isinstance(sched.get(ds.TYPE), str):
        raise _invalid(path, "scheduler", sched, "it must be a mapping with a 'type' name (e.g. WarmupDecayLR)")
    _refuse_unknown(sched, (ds.TYPE, ds.SCHEDULER_PARAMS), _where(path, "scheduler"))
    name, params = sched[ds.TYPE], sched.get(ds.SCHEDULER_PARAMS, {})
    # DeepSpeed would also take a torch.optim.lr_scheduler name, but the trainer fills the run
    # length (role_ds_config) and restores the rate on resume (trainer.py) for DeepSpeed's own
    # schedulers only, so only those are accepted.
    if name not in lr_schedules.VALID_LR_SCHEDULES:
        raise ConfigError(f"{_where(path, 'scheduler.type')}: unknown scheduler '{name}'"
                          f"{_suggest(name, lr_schedules.VALID_LR_SCHEDULES)} "
                          f"(known: {', '.join(lr_schedules.VALID_LR_SCHEDULES)})")
    if not isinstance(params, dict):
        raise _invalid(path, "scheduler.params", params, "it must be a mapping")
    cls = getattr(lr_schedules, name)
    names, required = _signature_names(cls.__init__, ("optimizer",))
    _refuse_unknown(params, names, _where(path, "scheduler.params"), f" for {name}")
    fills = {k: v for k, v in trainer_fills.items() if k in names}
    for key in required:
        if key not in params and key not in fills:
            raise ConfigError(f"{_where(path, 'scheduler.params')}: {name} needs '{key}'")
    for key, value in params.items():
        _check_scheduler_value(key, value, path)

    def build(kw: dict) -> None:
        optimizer = torch.optim.SGD(_dummy_parameters(), lr=0.1)
        cls(optimizer, **{**fills, **{k: params[k] for k in required if k in params}, **kw})

    _build_or_blame(build, params, _where(path, "scheduler.params"), name)
