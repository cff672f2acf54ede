"""Helpers for tests that run the console scripts as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
# The tiny model on real GSM8K: 512 byte-tokens fit a question and its answer.
TINY = ["model=tiny", "task=gsm8k", "train.batch_size=2", "train.seq_len=512", "task.max_samples=64",
        "logging.progress=false"]


def cli_env(data_root: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "PRUNEDLORA_DATA_ROOT": str(data_root), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            **extra}


def run_cli(args: list[str], data_root: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``prunedlora-*`` from this venv with the mirror and no network."""
    return subprocess.run([str(BIN / args[0]), *args[1:]], env=cli_env(data_root), capture_output=True, text=True,
                          timeout=timeout)


def logged_steps(metrics: Path) -> int:
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0
