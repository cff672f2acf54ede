"""The console scripts as a user runs them: subprocesses, real data, the tiny model."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import BIN, TINY, cli_env, logged_steps, run_cli


@pytest.mark.slow
def test_train_writes_the_contract_run_directory(tmp_path: Path, data_root: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli(["prunedlora-train", *TINY, "method=lora", "train.max_steps=3", "eval.limit=2", "eval.seqlen=64",
                    "eval.max_gen_toks=8", "eval.num_fewshot=1", f"hydra.run.dir={run_dir}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (".hydra/config.yaml", "metrics.jsonl", "checkpoints/step_0000003/state.pt",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "model/config.json",
                 "model/model.safetensors", "eval/results.json", "summary.json"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("method", "model", "steps", "final_loss", "params_total", "params_trainable", "params_after_export",
                "ranks", "eval", "wall_time_s", "peak_memory_mb"):
        assert key in summary, key
    assert summary["steps"] == 3 and set(summary["eval"]) == {"gsm8k", "wikitext2"}
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert "| task |" in proc.stdout  # the results table is printed

    # prunedlora-eval on the finished run, into its own output dir (nothing in the run dir is touched)
    eval_dir = tmp_path / "eval"
    proc = run_cli(["prunedlora-eval", f"run_dir={run_dir}", "eval.tasks=[wikitext2]", "eval.limit=2",
                    "eval.seqlen=64", "logging.progress=false", f"hydra.run.dir={eval_dir}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = json.loads((eval_dir / "eval" / "results.json").read_text())["results"]["wikitext2"]["ppl"]
    assert ours == pytest.approx(summary["eval"]["wikitext2"]["ppl"], rel=1e-4)


@pytest.mark.parametrize("args, fragment", [
    (["method.rnak=4"], "method.rnak"),
    (["train.lr=-1"], "train.lr=-1"),
    (["model=hf", "model.name_or_path=/nonexistent/model"], "/nonexistent/model"),
])
def test_bad_input_is_one_paragraph_without_traceback(tmp_path: Path, data_root: Path, args, fragment) -> None:
    proc = run_cli(["prunedlora-train", *TINY, *args, f"hydra.run.dir={tmp_path}"], data_root)
    assert proc.returncode != 0
    assert fragment in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_restart_resumes_to_the_same_loss(tmp_path: Path, data_root: Path) -> None:
    """A preempted run (SIGTERM mid-training) restarted with the same command ends at the uninterrupted loss."""
    # A wider tiny model so that steps take long enough to interrupt mid-run.
    args = [*TINY, "method=lora", "model.tiny.hidden_size=256", "model.tiny.intermediate_size=512",
            "train.max_steps=12", "train.save_every=100", "eval.enabled=false"]
    env = cli_env(data_root)
    victim_dir = tmp_path / "preempted"
    proc = subprocess.Popen([str(BIN / "prunedlora-train"), *args, f"hydra.run.dir={victim_dir}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = victim_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and logged_steps(metrics) < 3:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    interrupted_at = len(metrics.read_text().splitlines())
    assert 3 <= interrupted_at < 12
    assert (victim_dir / "checkpoints" / f"step_{interrupted_at:07d}").is_dir()

    resumed = run_cli(["prunedlora-train", *args, f"hydra.run.dir={victim_dir}"], data_root)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = run_cli(["prunedlora-train", *args, f"hydra.run.dir={tmp_path / 'straight'}"], data_root)
    assert straight.returncode == 0, straight.stderr[-3000:]
    final = [json.loads((d / "summary.json").read_text())["final_loss"] for d in (victim_dir, tmp_path / "straight")]
    assert final[0] == pytest.approx(final[1], abs=1e-6)



@pytest.mark.slow
def test_smollm2_end_to_end_with_a_handful_of_steps(tmp_path: Path, data_root: Path) -> None:
    """The real model (offline GGUF fallback) through train, export, GSM8K and WikiText-2 evaluation."""
    run_dir = tmp_path / "smol"
    proc = run_cli(["prunedlora-train", "model=smollm2_135m", "method=lora", "task=gsm8k", "train.max_steps=2",
                    "train.batch_size=2", "train.seq_len=256", "train.bf16=true", "eval.limit=1", "eval.seqlen=256",
                    "eval.num_fewshot=0", "eval.max_gen_toks=16", "logging.progress=false",
                    f"hydra.run.dir={run_dir}"], data_root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["params_total"] == 134_515_008 and summary["params_after_export"] == 134_515_008
    assert len(summary["ranks"]) == 30 * 4
    assert 1.0 < summary["eval"]["wikitext2"]["ppl"] < 200.0  # a real model, not a random one
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(run_dir / "model").config.num_hidden_layers == 30


@pytest.mark.slow
def test_wheel_ships_the_config_tree(tmp_path: Path) -> None:
    """A non-editable install finds `configs/` as package data `prunedlora/configs/`."""
    import zipfile

    from cli_helpers import ROOT

    proc = subprocess.run([str(BIN / "python"), "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = zipfile.ZipFile(next(tmp_path.glob("prunedlora-*.whl"))).namelist()
    for member in ("prunedlora/configs/__init__.py", "prunedlora/configs/config.yaml",
                   "prunedlora/configs/method/lora.yaml", "prunedlora/configs/experiment/quickstart.yaml",
                   "prunedlora/configs/hydra/launcher/slurm.yaml", "prunedlora/cli.py"):
        assert member in names, member


@pytest.mark.slow
def test_wandb_offline_run_logs_without_network(tmp_path: Path, data_root: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**cli_env(data_root), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([str(BIN / "prunedlora-train"), *TINY, "method=prunedlora", "method.init_rank=8",
                           "method.rank=4", "sparsity.every=1", "train.max_steps=3", "eval.tasks=[wikitext2]",
                           "eval.limit=1", "eval.seqlen=64", "logging.wandb=true", f"hydra.run.dir={run_dir}"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline_runs = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 1 and offline_runs[0].stat().st_size > 0
    assert (run_dir / "checkpoints" / "wandb_id").is_file()
    logged = offline_runs[0].read_bytes()  # protobuf records; the keys are plain strings inside
    for key in (b"train/loss", b"eval/wikitext2/ppl", b"eval/results"):
        assert key in logged, key
