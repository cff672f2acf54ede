"""A damaged checkpoint never stops a resume with a raw error, and never gets deleted.

A 4-step tiny run saves ``step_2`` and ``step_4``; its outputs are then removed (as if it had been killed after
the second checkpoint) and ``step_4/state.pt`` is damaged. The re-run names the file, resumes from ``step_2`` and
ends at the losses of the uninterrupted run; the damaged one is kept, byte for byte, out of the way. When no
checkpoint loads, the run refuses with one paragraph naming every file, and changes nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from recipe_helpers import TINY_OVERRIDES, compose_root

from prunedlora.train import checkpoint as ckpt
from prunedlora.train.recipe import run

STEPS = ["train.max_steps=4", "train.save_every=2", "task.max_samples=16"]
OUTPUTS = ("summary.json", "adapter", "model")


def _damage(state: Path, how: str) -> None:
    if how == "truncated":
        state.write_bytes(state.read_bytes()[:100])
    elif how == "empty":
        state.write_bytes(b"")
    elif how == "not_a_checkpoint":  # a loadable torch file, but someone else's
        torch.save({"model": torch.zeros(3)}, state)
    elif how == "text":
        state.write_text("notes about this run\n")


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _killed_copy(finished: Path, to: Path) -> Path:
    """``finished`` as it was when killed after its last checkpoint: no summary, adapter or model."""
    shutil.copytree(finished, to)
    for name in OUTPUTS:
        path = to / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return to


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory, data_root: Path) -> tuple[Path, list[float]]:
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    run(compose_root([*TINY_OVERRIDES, *STEPS], data_root), run_dir)
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_0000002", "step_0000004"]
    return run_dir, _losses(run_dir)


@pytest.mark.parametrize("how", ["truncated", "empty", "not_a_checkpoint", "text"])
def test_a_damaged_newest_checkpoint_is_named_kept_and_skipped(how: str, finished, tmp_path: Path, data_root: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    source, losses = finished
    run_dir = _killed_copy(source, tmp_path / "run")
    bad = run_dir / "checkpoints" / "step_0000004" / ckpt.STATE_FILE
    _damage(bad, how)
    damaged = bad.read_bytes()
    with caplog.at_level(logging.WARNING):
        summary = run(compose_root([*TINY_OVERRIDES, *STEPS], data_root), run_dir)
    (warning,) = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    kept = run_dir / "checkpoints" / "unreadable_step_0000004"
    assert str(bad) in warning and str(kept) in warning and "step_0000002" in warning
    assert (kept / ckpt.STATE_FILE).read_bytes() == damaged  # kept as it was, out of resume and rotation
    assert summary["steps"] == 4 and _losses(run_dir) == pytest.approx(losses, abs=1e-6)  # resumed at step 2
    assert [p.name for p in ckpt.list_checkpoints(run_dir / "checkpoints")] == ["step_0000002", "step_0000004"]
    assert ckpt.load_checkpoint(run_dir / "checkpoints" / "step_0000004")[ckpt.STEP_KEY] == 4  # saved anew


def test_no_readable_checkpoint_refuses_and_changes_nothing(finished, tmp_path: Path, data_root: Path) -> None:
    run_dir = _killed_copy(finished[0], tmp_path / "run")
    states = [p / ckpt.STATE_FILE for p in ckpt.list_checkpoints(run_dir / "checkpoints")]
    _damage(states[0], "empty")
    _damage(states[1], "truncated")
    before = {p: p.read_bytes() for p in sorted((run_dir / "checkpoints").rglob("*")) if p.is_file()}
    with pytest.raises(ckpt.CheckpointUnreadable) as err:
        run(compose_root([*TINY_OVERRIDES, *STEPS], data_root), run_dir)
    message = str(err.value)
    assert "\n" not in message and "none of the 2 checkpoint(s)" in message
    assert all(f"{p} is unreadable" in message for p in states) and "hydra.run.dir" in message
    assert {p: p.read_bytes() for p in sorted((run_dir / "checkpoints").rglob("*")) if p.is_file()} == before


@pytest.mark.slow
def test_the_cli_refuses_in_one_paragraph_with_the_run_error_exit_code(finished, tmp_path: Path,
                                                                       data_root: Path) -> None:
    from cli_helpers import TINY, run_cli

    run_dir = _killed_copy(finished[0], tmp_path / "run")
    for path in ckpt.list_checkpoints(run_dir / "checkpoints"):
        _damage(path / ckpt.STATE_FILE, "truncated")
    proc = run_cli(["prunedlora-train", *TINY, "method=lora", "eval.enabled=false", *STEPS, "data.hub=false",
                    f"data.root={data_root}", f"hydra.run.dir={run_dir}"], data_root)  # the config compose_root made
    assert proc.returncode == 1, proc.stderr[-3000:]
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("prunedlora: error:")]
    assert "CheckpointUnreadable: cannot resume" in line and "step_0000004/state.pt is unreadable" in line
    assert "PytorchStreamReader" in line and "Traceback" not in proc.stderr


def test_a_save_is_on_disk_before_and_after_its_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The state file and the staging directory are synced before the rename, the parent directory after it."""
    events: list[tuple[str, str]] = []
    real_fsync, real_rename = os.fsync, Path.rename

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def rename(self: Path, target: Path) -> Path:
        events.append(("rename", str(target)))
        return real_rename(self, target)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(Path, "rename", rename)
    root = (tmp_path / "checkpoints").resolve()
    final = ckpt.commit_checkpoint(root, 3, {"step": 3}, keep=2)
    staging = ckpt.staging_dir(root, 3)
    assert events == [("fsync", str(staging / ckpt.STATE_FILE)), ("fsync", str(staging)), ("rename", str(final)),
                      ("fsync", str(root))]
    assert torch.load(final / ckpt.STATE_FILE) == {"step": 3}


def test_a_metrics_line_cut_short_by_a_kill_is_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """kill -9 during a write leaves a partial last line; resuming drops it (and later steps), keeps the rest."""
    from prunedlora.train.loop import MetricsWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.2}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING, logger="prunedlora.train.loop"):
        MetricsWriter(path).truncate_after(2)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert "line 4 is not a complete record" in caplog.text
