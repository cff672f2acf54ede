"""Resumable checkpoints: everything needed to continue a run mid-epoch, bit for bit.

A checkpoint is one ``state.pt`` dict under ``checkpoints/step_<N>/`` with the named keys below. It holds
the adapter (trainable parameters plus the buffers of our own modules: rank masks, structure masks),
never the frozen base; the optimizer and scheduler; every RNG; the data position; each callback's state
(scores, EMAs, schedule position) and the resolved config. Directories are written under a temporary
name, flushed to disk (the file and its directory) and renamed, and the rename itself is flushed, so neither an
interrupted save nor a power loss leaves a half checkpoint behind under a final name.

Resuming reads the newest checkpoint that loads (:func:`load_newest`): one whose ``state.pt`` is damaged
(truncated, empty, not a checkpoint) is named and skipped, never deleted; when none loads the run refuses
with :class:`CheckpointUnreadable`.
"""

from __future__ import annotations

import errno
import os
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
UNREADABLE_PREFIX = "unreadable_"
"""A skipped, damaged checkpoint ``step_<N>/`` is kept as ``unreadable_step_<N>/`` (out of resume and rotation)."""
_REQUIRED_KEYS = (STEP_KEY, ADAPTER_KEY, RNG_KEY, DATA_KEY, CALLBACKS_KEY)


class CheckpointUnreadable(RuntimeError):
    """A checkpoint's ``state.pt`` cannot be read (or, from :func:`load_newest`, none of the run's can)."""


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


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot sync a directory; the data itself was synced
        if not path.is_dir() or exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def commit_checkpoint(ckpt_root: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` into the staging dir, rename it to ``step_<step>/``, keep the newest ``keep``.

    Everything in the staging dir (``state.pt``, DeepSpeed's files) and the dir itself are synced before the
    rename, and ``ckpt_root`` after it: a renamed ``step_<N>/`` always holds a whole file.
    """
    tmp, final = staging_dir(ckpt_root, step), ckpt_root / f"{_PREFIX}{step:07d}"
    tmp.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp / STATE_FILE)
    for path in sorted(tmp.rglob("*"), key=lambda p: len(p.parts), reverse=True):  # files before their dirs
        _fsync(path)
    _fsync(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    _fsync(ckpt_root)
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
    """The state saved in checkpoint directory ``path``.

    Raises:
        CheckpointUnreadable: ``path/state.pt`` cannot be loaded or is not a prunedlora checkpoint; the message
            names the file and what loading it said.
    """
    file = path / STATE_FILE
    try:
        # weights_only=False: the state holds RNG tuples and plain config dicts written by us.
        state = torch.load(file, map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as exc:  # torch.load's errors for a damaged file vary: RuntimeError, EOFError, pickle's...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "no message"
        raise CheckpointUnreadable(f"{file} is unreadable ({type(exc).__name__}: {reason})") from exc
    missing = [k for k in _REQUIRED_KEYS if k not in state] if isinstance(state, dict) else list(_REQUIRED_KEYS)
    if missing:
        raise CheckpointUnreadable(f"{file} is unreadable: it loads, but it is not a prunedlora checkpoint "
                                   f"(no {', '.join(missing)})")
    return state


def load_newest(ckpt_root: Path) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]] | None:
    """The newest checkpoint that loads: its directory, its state, and the newer ones skipped with why.

    Returns None when there is no checkpoint at all.

    Raises:
        CheckpointUnreadable: there are checkpoints and none of them loads (one paragraph: each file and why,
            and the fix). Nothing is moved or deleted.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(list_checkpoints(ckpt_root)):
        try:
            return path, load_checkpoint(path), skipped
        except CheckpointUnreadable as exc:
            skipped.append((path, str(exc)))
    if not skipped:
        return None
    raise CheckpointUnreadable(
        f"cannot resume: none of the {len(skipped)} checkpoint(s) in {ckpt_root} can be read: "
        + "; ".join(reason for _, reason in skipped)
        + ". Nothing was changed. Put back a good state.pt (from a backup), or train this config again in a new run "
        "directory (another hydra.run.dir).")


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint ``step_<N>/`` to ``unreadable_step_<N>/`` (``-2``, ``-3``... when taken).

    Kept for inspection, it no longer counts as a checkpoint: a new save of step N cannot replace it and the
    rotation of ``train.keep_checkpoints`` cannot count it as one of the kept ones.
    """
    target, n = path.with_name(UNREADABLE_PREFIX + path.name), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{UNREADABLE_PREFIX}{path.name}-{n}")
    path.rename(target)
    return target
