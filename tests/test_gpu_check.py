"""``scripts/gpu_check.sh`` stays runnable on machines without a GPU: its dry run composes and validates every run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def test_gpu_check_dry_run_validates_every_run() -> None:
    env = {**os.environ, "BIN": str(Path(sys.executable).parent)}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=300,
                            check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    planned = [line for line in result.stdout.splitlines() if line.startswith("would run ")]
    for method in ("lora", "droplora", "prunedlora", "loraprune", "salr", "adalora"):
        assert any(f"{method}-eager:" in line for line in planned), method
        assert any(f"{method}-compile:" in line and "train.compile=true" in line for line in planned), method
    assert any("deepspeed_zero2" in line for line in planned) and any("quantization=nf4" in line for line in planned)


def test_gpu_check_refuses_unknown_arguments() -> None:
    result = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2 and "usage" in result.stderr
