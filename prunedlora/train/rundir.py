"""Run-directory guard: resume the same run, refuse to mix two different ones.

The first start of a run writes the resolved config to ``checkpoints/config.json`` and keeps a copy of
Hydra's ``.hydra/`` beside it. A later start in the same directory compares its config with that one:
equal (up to keys that do not change what is trained) means "resume"; different means refusal, and
Hydra's ``.hydra/`` (which Hydra has already rewritten by then) is put back as it was.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from prunedlora.config import ConfigError

CONFIG_FILE = "config.json"
HYDRA_BACKUP = "hydra"
# Keys that may change between starts of one run: they do not change what is trained (skip_nonfinite only
# decides whether a diverged run may step past a non-finite step after resuming from its last good checkpoint).
RESUME_FREE_KEYS = ("eval", "logging", "debug", "run_dir", "train.num_threads", "train.save_every",
                    "train.keep_checkpoints", "train.skip_nonfinite")
# Keys added to the config after runs were first written, with the value that reproduces what those runs did: a run
# whose saved config lacks one resumes when the new start has that value (a CE run from before ``recovery``).
ADDED_KEYS = {"recovery.name": "ce", "recovery.alpha": 1.0, "recovery.temperature": 1.0,
              "recovery.teacher_dtype": "bfloat16", "recovery.teacher_offload": False}
_RUN_OUTPUTS = ("metrics.jsonl", "adapter", "model", "compressed", "summary.json")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, path + "."))
        else:
            flat[path] = value
    return flat


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ, ignoring ``RESUME_FREE_KEYS`` (a key of ``ADDED_KEYS`` that ``old`` lacks
    has its value there)."""
    a, b = {**ADDED_KEYS, **_flatten(old)}, _flatten(new)

    def free(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUME_FREE_KEYS)

    return sorted(k for k in set(a) | set(b) if not free(k) and a.get(k) != b.get(k))


def _has_progress(run_dir: Path) -> bool:
    """Whether a start in ``run_dir`` got as far as a checkpoint or an output."""
    checkpoints = run_dir / "checkpoints"
    # step_*: a checkpoint; pruned_base: LoRAPrune's one-shot cut, saved before the first step
    has_checkpoint = checkpoints.is_dir() and any(p.name.startswith(("step_", "pruned_base")) for p in
                                                  checkpoints.iterdir())
    return has_checkpoint or any((run_dir / name).exists() for name in _RUN_OUTPUTS)


def prepare_run_dir(run_dir: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """Claim ``run_dir`` for ``config``. Returns the summary if this exact run already completed.

    Raises:
        ConfigError: ``run_dir`` holds a different run, or outputs of a run it cannot identify.
    """
    ckpt_dir = run_dir / "checkpoints"
    saved = ckpt_dir / CONFIG_FILE
    hydra_dir = run_dir / ".hydra"
    if saved.exists() and not _has_progress(run_dir):
        saved.unlink()  # an earlier start failed before its first checkpoint: nothing of it to keep
    if not saved.exists():
        foreign = [name for name in _RUN_OUTPUTS if (run_dir / name).exists()]
        if foreign:
            raise ConfigError(
                f"The run directory {run_dir} already holds {', '.join(foreign)} but no record of the config "
                "that produced them, so prunedlora will not write into it. Choose a new directory with "
                "hydra.run.dir=<path>, or move those files away."
            )
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(config, indent=2, default=str) + "\n")
        if hydra_dir.is_dir():
            shutil.copytree(hydra_dir, ckpt_dir / HYDRA_BACKUP, dirs_exist_ok=True)
        return None

    previous = json.loads(saved.read_text())
    differences = config_differences(previous, json.loads(json.dumps(config, default=str)))
    if differences:
        backup = ckpt_dir / HYDRA_BACKUP
        if backup.is_dir():  # Hydra rewrote .hydra/ for this start; put the original run's back
            shutil.copytree(backup, hydra_dir, dirs_exist_ok=True)
        shown = ", ".join(f"{k} (was {_flatten(previous).get(k)!r})" for k in differences[:8])
        raise ConfigError(
            f"The run directory {run_dir} holds a run with a different config ({shown}). Re-running in the "
            "same directory resumes only the same run; to start a new one choose another directory with "
            "hydra.run.dir=<path>."
        )
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else None
