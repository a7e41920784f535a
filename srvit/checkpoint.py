"""Checkpoint I/O: safetensors weights with the model config, labels and preprocessing as JSON metadata.

Nothing here unpickles: a checkpoint is one `.safetensors` file whose header metadata
holds `{"srvit": "<json>"}`; training state (optimizer moments) lives in a second one.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from srvit.model import SRViT, SRViTConfig

FORMAT = "srvit-checkpoint/1"
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


class CheckpointError(ValueError):
    pass


def check_not_pickle(path: Path) -> None:
    """Refuse torch.save/pickle files before any loader sees them."""
    with open(path, "rb") as f:
        head = f.read(4)
    if path.suffix != ".safetensors" or head.startswith(_PICKLE_MAGIC):
        raise CheckpointError(
            f"{path}: only .safetensors checkpoints are accepted; pickled files (.pt, .pth, .bin) "
            "can run arbitrary code when loaded. Convert with safetensors.torch.save_file."
        )


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: SRViT, meta: dict) -> None:
    """Weights plus metadata: `meta` must hold labels and preprocessing; the config is added here."""
    meta = {"format": FORMAT, **meta, "config": model.cfg.to_dict()}
    _atomic_save(model.state_dict(), Path(path), {"srvit": json.dumps(meta)})


def read_metadata(path: Path) -> dict:
    path = Path(path)
    check_not_pickle(path)
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("srvit")
    if raw is None:
        raise CheckpointError(f"{path}: no 'srvit' metadata; not an srvit checkpoint")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise CheckpointError(f"{path}: its 'srvit' metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return meta


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error that lists every missing, unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = [f"missing keys {missing}"] * bool(missing) + [f"unexpected keys {unexpected}"] * bool(unexpected)
    problems += [f"shape mismatch {s}" for s in shapes]
    if problems:
        raise CheckpointError(f"{source} does not match the model: " + "; ".join(problems))


def load_checkpoint(path: Path, device: str = "cpu") -> tuple[SRViT, dict]:
    """The model (eval mode) and its metadata."""
    meta = read_metadata(path)
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path}: its metadata has no model 'config'; re-save it with srvit")
    model = SRViT(SRViTConfig.from_dict(meta["config"]))
    state = load_file(str(path), device=device)
    check_state_dict(model, state, str(path))
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def save_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, meta: dict,
                        rng_states: list[tuple[torch.Tensor, tuple]] | None = None) -> None:  # fmt: skip
    """Everything needed to resume: weights, AdamW moments and step counters, the random number generators
    (torch's and Python's: augmentation and depth sampling draw from them), progress in `meta`.

    `rng_states` holds every process's (torch, Python) generator states under torchrun, rank by rank
    (`rng_state()`); by default, this process's own."""
    rng_states = rng_states or [rng_state()]
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    tensors.update({f"rng.torch.{rank}": torch_state for rank, (torch_state, _) in enumerate(rng_states)})
    opt = optimizer.state_dict()
    steps = {}
    for idx, st in opt["state"].items():
        steps[str(idx)] = float(st["step"])
        tensors.update({f"optim.{idx}.{k}": v for k, v in st.items() if k != "step"})
    meta = {"format": FORMAT, **meta, "optim_steps": steps, "param_groups": opt["param_groups"]}
    meta["rng_python"] = [python_state for _, python_state in rng_states]
    _atomic_save(tensors, Path(path), {"srvit": json.dumps(meta)})


def rng_state() -> tuple[torch.Tensor, tuple]:
    return torch.get_rng_state(), random.getstate()


def load_training_state(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                        rank: int = 0, world: int = 1) -> dict:  # fmt: skip
    """Restore weights, optimizer and this process's random number generators; returns `meta`.

    The generators come back only when the run was saved by as many processes as resume it: with
    another world size, each process keeps the seed it started with, and the draws differ."""
    meta = read_metadata(path)
    saved, ours = meta.get("model_config"), model.cfg.to_dict()
    if saved is not None:
        saved = SRViTConfig.from_dict(saved).to_dict()  # fields added since the run was saved take their defaults
        if saved != ours:
            changed = ", ".join(f"{k} {saved.get(k)!r} there, {v!r} here" for k, v in ours.items() if saved.get(k) != v)
            raise CheckpointError(f"{path} is a run of another model config ({changed}): train into a new --out")
    tensors = load_file(str(path))
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    check_state_dict(model, state, f"{path} (a run of another model config? train into a new --out)")
    model.load_state_dict(state)
    opt_state = {int(i): {"step": torch.tensor(s)} for i, s in meta["optim_steps"].items()}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, name = k.split(".", 2)
            opt_state[int(idx)][name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    if "rng.torch" in tensors:  # written before every rank's generators were kept: one process's
        tensors["rng.torch.0"], meta["rng_python"] = tensors["rng.torch"], [meta["rng_python"]]
    if len(meta.get("rng_python", [])) == world:
        torch.set_rng_state(tensors[f"rng.torch.{rank}"])
        version, state, gauss = meta["rng_python"][rank]
        random.setstate((version, tuple(state), gauss))
    return meta
