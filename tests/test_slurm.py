"""SLURM paths without SLURM: launcher presets, the plain sbatch script's requeue, submitit_local sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import BIN, ROOT, cli_env, logged_steps
from cli_helpers import TINY as TINY_TRAIN
from hydra import compose, initialize_config_module

from prunedlora.compose import register_configs

TINY = [*TINY_TRAIN, "eval.enabled=false"]


def test_slurm_launcher_presets_compose() -> None:
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="prunedlora.configs"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.account=lab"], return_hydra_config=True)
        launcher = cfg.hydra.launcher
        assert launcher.partition == "gpu" and launcher.account == "lab"
        assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0 and launcher.gpus_per_node == 1
        assert "SlurmLauncher" in launcher._target_
        cpu = compose("config", overrides=["hydra/launcher=slurm_cpu"], return_hydra_config=True).hydra.launcher
        assert cpu.gpus_per_node == 0


@pytest.mark.slow
def test_sbatch_script_forwards_the_warning_signal_and_requeues(tmp_path: Path, data_root: Path) -> None:
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path / 'scontrol.args'}\n")
    (fake_bin / "scontrol").chmod(0o755)
    env = cli_env(data_root, PATH=f"{fake_bin}:{BIN}:{os.environ['PATH']}", SLURM_JOB_ID="4242")
    run_dir = tmp_path / "run"
    args = [*TINY, "method=lora", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
            "train.max_steps=200", "train.save_every=1000"]
    job = subprocess.Popen(["bash", str(ROOT / "scripts/slurm/train.sbatch"), str(run_dir), *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and logged_steps(metrics) < 2:
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` delivers to the batch shell
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 0, stderr[-2000:]
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    steps = len(metrics.read_text().splitlines())
    assert (run_dir / "checkpoints" / f"step_{steps:07d}" / "state.pt").is_file()
    assert not (run_dir / "summary.json").exists()


@pytest.mark.slow
def test_submitit_local_sweep_gives_each_job_its_own_run_dir(tmp_path: Path, data_root: Path) -> None:
    env = cli_env(data_root)
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        [str(BIN / "prunedlora-train"), "-m", "hydra/launcher=submitit_local", *TINY, "method=lora",
         "train.max_steps=2", "sparsity.final=0.25,0.5", f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=10"],
        env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    finals = sorted(json.loads((s.parent / "checkpoints" / "config.json").read_text())["sparsity"]["final"]
                    for s in summaries)
    assert finals == [0.25, 0.5]
    assert len(list(sweep.glob(".submitit/*"))) >= 2  # each job ran in its own submitit process

