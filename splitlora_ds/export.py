"""Export a checkpoint as a standard PEFT adapter (or a merged model) for the Hugging Face model.

    python -m splitlora_ds.export --checkpoint DIR [--checkpoint DIR ...] --out OUT [--merge]

Hosts without a shared filesystem each keep their own ranks' parts: pass every host's folder
(copied to one machine) as its own --checkpoint, or server0's folder alone when the run gathered
the clients' adapters there (checkpoint.gather_adapters); the newest step that has every role's
adapters across the folders is exported.

The clients' adapters are averaged with the run's FedAvg weights (sample counts recorded in the
checkpoint), joined with the server stages' adapters, and renamed from the split layer list
(`layers.<i>.<module>`) to the Hugging Face model's module paths through each layer's
`checkpoint_keys` map, the same map that loads pretrained weights. OUT then loads with
`PeftModel.from_pretrained(base, OUT)` (or, with --merge, `AutoModelForCausalLM.from_pretrained(OUT)`).
A randomly initialised base (no `model.pretrained`) is rebuilt from its seed and saved as OUT/base.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from . import checkpoint as ckpt
from .federation.fedavg import fedavg, sample_weights
from .config import RunConfig, from_dict
from .data import load_tokenizer
from .runtime.schedules import is_aggregation_step
from .errors import ConfigError
from .federation.exchange import participant_weights
from .federation.lowrank import aggregate_state_dicts, factor_names
from .hetero.setup import ClientSetup, setup_from_dict
from .models import get_family
from .models.base import build_layer, strip_peft

_LORA_MARK = ".lora_"


def locate(specs: list[str]) -> tuple[dict, dict[str, Path]]:
    """(metadata, {role: its adapters file}) of the newest step that has every role's adapters
    across `specs` (step folders, or checkpoint.dirs: one per host, or one shared folder)."""
    metas: dict[int, list[dict]] = {}
    files: dict[int, dict[str, Path]] = {}
    for spec in specs:
        path = Path(spec)
        is_step = path.name.startswith(ckpt.PREFIX) and path.name[len(ckpt.PREFIX):].isdigit()
        for directory in [path] if is_step else ckpt.step_dirs(path):
            step = ckpt.step_of(directory)
            markers = sorted(directory.glob(f"*{ckpt.MARK}")) + sorted(directory.glob(ckpt.META))
            metas.setdefault(step, []).extend(ckpt.read_meta(directory, m.name[:-len(ckpt.MARK)])
                                              if m.name.endswith(ckpt.MARK) else ckpt.read_meta(directory)
                                              for m in markers)
            for f in directory.glob("*.safetensors"):
                files.setdefault(step, {}).setdefault(f.name[:-len(".safetensors")], f)
    newest_missing = None
    for step in sorted(metas, reverse=True):
        if not metas[step]:
            continue
        meta = dict(metas[step][0])
        missing = [r for r in meta["roles"] if r not in files.get(step, {})]
        if missing:
            newest_missing = newest_missing or (step, missing)
            continue
        # A server's marker has no sample counts (only clients learn them): take a client's.
        meta["sample_counts"] = next((m["sample_counts"] for m in metas[step] if m.get("sample_counts")),
                                     meta.get("sample_counts", []))
        return meta, {r: files[step][r] for r in meta["roles"]}
    where = ", ".join(specs)
    if newest_missing:
        step, missing = newest_missing
        raise ConfigError(f"export: no complete checkpoint in {where}: step {step} lacks the adapters of "
                          f"{', '.join(missing)} (pass each host's checkpoint folder as its own --checkpoint)")
    raise ConfigError(f"export: no complete checkpoint (a {ckpt.PREFIX}N folder with its parts) in {where}")


def averaged_adapters(files: dict[str, Path], meta: dict) -> dict[str, torch.Tensor]:
    """Our-named adapters of the whole model: FedAvg of the clients, plus every server stage."""
    roles = meta["roles"]
    clients = [r for r in roles if r.startswith("client")]
    merged: dict[str, torch.Tensor] = {}
    if clients:
        counts = meta["sample_counts"]
        # With logical clients (more clients than client ranks) checkpoints come at round ends,
        # where every client rank holds the global adapters: any convex weights give them back.
        weights = sample_weights(counts) if len(counts) == len(clients) else [1 / len(clients)] * len(clients)
        merged.update(fedavg([load_file(str(files[r])) for r in clients], weights))
    for role in roles:
        if not role.startswith("client"):
            merged.update(load_file(str(files[role])))
    return merged


def heterogeneous_adapters(files: dict[str, Path], meta: dict, cfg: RunConfig, setup: ClientSetup) -> dict[str, torch.Tensor]:
    """One adapter per module from holders of different blocks and ranks (HSplitLoRA).

    Right after an aggregation every holder of a module holds the same update at its own rank
    (exactly, or its best approximation at that rank): the highest-rank holder's factors are the
    model. Between aggregations the holders are combined first, as the next aggregation would."""
    roles = meta["roles"]
    states = [load_file(str(files[r])) for r in roles]
    names = [factor_names(sd) for sd in states]
    # logical clients: checkpoints come at round ends only, right after an aggregation
    aggregated = cfg.logical_clients or is_aggregation_step(meta["step"] - 1, cfg.federation.aggregate_every,
                                                            meta.get("run_steps", cfg.train.max_steps))
    if not aggregated:
        client_weights = sample_weights(meta["sample_counts"])
        entry = [k + 1 for k in setup.client_layers]
        weights = [participant_weights(n, int(r[len("client"):]) if r.startswith("client") else None, client_weights,
                                       entry) for r, n in zip(roles, names)]
        scales = [{m: cfg.lora.alpha / sd[a].shape[0] for m, (a, _b) in n.items()} for sd, n in zip(states, names)]
        states = aggregate_state_dicts(states, weights, scales, setup.aggregation)
    out: dict[str, torch.Tensor] = {}
    for module in sorted(set().union(*names)):
        holders = [i for i, n in enumerate(names) if module in n]
        top = max(holders, key=lambda i: states[i][names[i][module][0]].shape[0])  # first of the highest rank
        for key in names[top][module]:
            out[key] = states[top][key]
    return out


def base_model(cfg: RunConfig, family, hf_config) -> PreTrainedModel:
    """The Hugging Face model the adapters belong to: the pretrained one, or the random init
    rebuilt layer by layer from the run's seed."""
    if cfg.model.pretrained:
        return AutoModelForCausalLM.from_pretrained(cfg.model.pretrained, config=hf_config, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    hf_state = model.state_dict()
    for spec in family.layer_specs(hf_config):
        layer = build_layer(spec, cfg.train.seed)
        for name, tensor in layer.state_dict().items():
            key = next((k for k in spec.checkpoint_keys(name) if k in hf_state), None)
            if key is None:
                continue  # non-persistent helpers (e.g. rotary tables) have no HF key
            with torch.no_grad():
                hf_state[key].copy_(tensor)
    return model


def hf_adapter_names(adapters: dict[str, torch.Tensor], family, hf_config, hf_modules: set[str]) -> dict[str, str]:
    """Our adapter names -> the PEFT model's parameter names (strict: every tensor maps)."""
    specs = family.layer_specs(hf_config)
    out = {}
    for name in adapters:
        _, index, rest = name.split(".", 2)  # "layers", "<i>", "<module path>.lora_A.default.weight"
        module, lora_part = rest.split(_LORA_MARK, 1)
        candidates = specs[int(index)].checkpoint_keys(strip_peft(module + ".weight"))
        hf_module = next((k.removesuffix(".weight") for k in candidates if k.removesuffix(".weight") in hf_modules), None)
        if hf_module is None:
            raise ConfigError(f"export: no module of the Hugging Face model matches {name} (tried {candidates})")
        out[name] = f"base_model.model.{hf_module}{_LORA_MARK}{lora_part}"
    return out


def export(checkpoint: str | list[str], out: str, merge: bool = False) -> Path:
    meta, files = locate([checkpoint] if isinstance(checkpoint, str) else list(checkpoint))
    cfg = from_dict(RunConfig, meta["config"], prefix="")
    family = get_family(cfg.model.family)
    hf_config = family.load_config(cfg.model.pretrained, cfg.model.config, cfg.model.attn_implementation)
    # The split points and ranks the run trained with (a budget plan depends on its ds_config,
    # which need not exist where the export runs).
    setup = setup_from_dict(meta["setup"]) if meta.get("setup") else None
    if setup is not None and setup.exchanges:
        adapters = heterogeneous_adapters(files, meta, cfg, setup)
    else:
        adapters = averaged_adapters(files, meta)
    model = base_model(cfg, family, hf_config)

    targets = sorted({n.split(_LORA_MARK)[0].rsplit(".", 1)[-1] for n in adapters})
    lora = cfg.lora
    rank = setup.server_rank if setup is not None else lora.rank
    fused = {family.fused_qkv_module: len(lora.fused_qkv)} if lora.fused_qkv and family.fused_qkv_module else {}
    rank_pattern = {k: rank * m for k, m in fused.items()}
    names = hf_adapter_names(adapters, family, hf_config, {n for n, _ in model.named_modules()})
    for ours, theirs in names.items():  # per-module ranks (heterogeneous clients, lora.rank_pattern)
        if ".lora_A." in ours and adapters[ours].shape[0] != rank:
            module = theirs.removeprefix("base_model.model.").split(_LORA_MARK)[0]
            rank_pattern[re.escape(module)] = adapters[ours].shape[0]  # peft matches it as a dotted suffix
    peft_config = PeftLoraConfig(r=rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                 target_modules=targets, fan_in_fan_out=family.fan_in_fan_out, bias="none",
                                 rank_pattern=rank_pattern,
                                 alpha_pattern={k: lora.alpha * m for k, m in fused.items()},
                                 task_type="CAUSAL_LM")
    out_path = Path(out)
    out_path.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    base_dir = None
    if not merge and not cfg.model.pretrained:
        base_dir = out_path / "base"  # before get_peft_model, which wraps the modules in place
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
    peft_model = get_peft_model(model, peft_config)
    params = dict(peft_model.named_parameters())
    trained = {n for n in params if _LORA_MARK in n}
    if set(names.values()) != trained:
        raise ConfigError(f"export: adapters and model disagree: {sorted(trained ^ set(names.values()))[:3]}")
    with torch.no_grad():
        for ours, theirs in names.items():
            params[theirs].copy_(adapters[ours])

    if merge:
        peft_model.merge_and_unload().save_pretrained(out_path)
    else:
        if base_dir is not None:
            peft_model.peft_config["default"].base_model_name_or_path = str(base_dir.resolve())
        peft_model.save_pretrained(out_path)
    tokenizer.save_pretrained(out_path)
    return out_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="splitlora_ds.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a step-N checkpoint folder, or a checkpoint.dir (its latest); repeat it for the folders "
                        "of several hosts")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--merge", action="store_true", help="write the merged full model instead of an adapter")
    args = p.parse_args(argv)
    try:
        path = export(args.checkpoint, args.out, args.merge)
    except ConfigError as e:
        print(f"splitlora_ds: error: {e}", file=sys.stderr)
        return 2
    kind = "merged model" if args.merge else "PEFT adapter"
    print(f"[splitlora_ds] {kind} written to {os.fspath(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
