"""Resumable checkpoints: everything needed to continue a run mid-epoch, bit for bit.

A checkpoint is one ``state.pt`` dict under ``checkpoints/step_<N>/`` with the named keys below. It holds
the adapter (trainable parameters plus the buffers of our own modules: rank masks, structure masks),
never the frozen base; the optimizer and scheduler; every RNG; the data position; each callback's state
(scores, EMAs, schedule position) and the resolved config. Directories are written under a temporary
name and renamed, so an interrupted save never leaves a half checkpoint behind.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunedlora.distributed import full_param

ADAPTER_KEY = "adapter"
OPTIMIZER_KEY = "optimizer"
SCHEDULER_KEY = "scheduler"
RNG_KEY = "rng"
DATA_KEY = "data"
CALLBACKS_KEY = "callbacks"
STEP_KEY = "step"
CONFIG_KEY = "config"
STATE_FILE = "state.pt"
_PREFIX = "step_"


def _owned_by_us(module: nn.Module) -> bool:
    return type(module).__module__.startswith("prunedlora.")


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and the buffers of prunedlora's own modules (masks), whole and on CPU.

    Under DeepSpeed ZeRO-3 reading a whole parameter is a collective: every rank must call this.
    """
    state = {n: full_param(p).detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    for mod_name, module in model.named_modules():
        if _owned_by_us(module):
            for buf_name, buf in module.named_buffers(recurse=False):
                state[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach().cpu().clone()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, trainable_too: bool = True) -> None:
    """Load what ``adapter_state_dict`` saved; every saved key must land and every trainable be covered.

    ``trainable_too=False`` loads only the rest (masks): under DeepSpeed, its own checkpoint restores the trainable
    parameters. The keys are checked the same way either way.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    result = model.load_state_dict(state if trainable_too else {k: v for k, v in state.items() if k not in trainable},
                                   strict=False)
    uncovered = sorted(trainable - set(state))
    if result.unexpected_keys or uncovered:
        raise RuntimeError(
            "checkpoint does not match the model: "
            f"unexpected keys {result.unexpected_keys[:5]}, trainable parameters missing {uncovered[:5]}"
        )


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def staging_dir(ckpt_root: Path, step: int) -> Path:
    """The temporary directory a checkpoint is written into before ``commit_checkpoint`` renames it."""
    return ckpt_root / f".tmp_{_PREFIX}{step:07d}"


def commit_checkpoint(ckpt_root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` into the staging dir, rename it to ``step_<step>/``, keep the newest ``keep``."""
    tmp, final = staging_dir(ckpt_root, step), ckpt_root / f"{_PREFIX}{step:07d}"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / STATE_FILE)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in list_checkpoints(ckpt_root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob(f"{_PREFIX}*") if (p / STATE_FILE).is_file())


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    # weights_only=False: the state holds RNG tuples and plain config dicts written by us.
    return torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
