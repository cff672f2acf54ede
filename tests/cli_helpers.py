"""Helpers for tests that run the console scripts as subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def kill_9_after_steps(args: list[str], run_dir: Path, data_root: Path, steps: int, timeout: float = 300) -> None:
    """Start ``prunedlora-train args hydra.run.dir=run_dir`` and SIGKILL it once ``steps`` steps are logged: no
    handler runs, nothing is flushed or saved on the way out (what a node failure or the OOM killer leaves)."""
    proc = subprocess.Popen([str(BIN / "prunedlora-train"), *args, f"hydra.run.dir={run_dir}"], env=cli_env(data_root),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and logged_steps(run_dir / "metrics.jsonl") < steps:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (code {proc.returncode}) before {steps} steps"
