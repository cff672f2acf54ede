"""Helpers for tests that drive the training recipe in-process: compose a config, crash and resume a run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra.core.config_store import ConfigStore

from prunedlora.compose import compose_config
from prunedlora.config import RootConfig
from prunedlora.data import batching
from prunedlora.methods.registry import method_specs, register, unregister
from prunedlora.train.recipe import run

# The tiny model on real GSM8K (512 byte-tokens fit a question and its answer), no evaluation.
TINY_OVERRIDES = [
    "model=tiny", "method=lora", "task=gsm8k", "train.batch_size=2", "train.seq_len=512",
    "task.max_samples=64", "eval.enabled=false", "logging.progress=false",
]

# Every registered method, with what it needs to prune (or allocate) within six steps of the tiny model: its
# registration's smoke_overrides (prunedlora.methods.registry), so a new method is covered without a test edit.
METHOD_OVERRIDES: dict[str, list[str]] = {name: list(spec.smoke_overrides) for name, spec in method_specs().items()}


def compose_root(overrides: list[str], data_root: Path | None = None) -> RootConfig:
    """The typed config for ``overrides`` (reading the local mirror ``data_root`` only, when given)."""
    cfg = compose_config(overrides)
    if data_root is not None:
        cfg.data.root, cfg.data.hub = str(data_root), False
    return cfg


class Interrupted(Exception):
    """Stands in for a crash or a kill in the middle of training."""


def crash_then_resume(cfg: RootConfig, run_dir: Path, crash_after_batches: int,
                      monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run until micro-batch ``crash_after_batches + 1`` is drawn (it raises), then run again to the end."""
    original, drawn = batching.ResumableBatches.next_batch, {"n": 0}

    def crashing_next_batch(self):
        drawn["n"] += 1
        if drawn["n"] > crash_after_batches:
            raise Interrupted
        return original(self)

    monkeypatch.setattr(batching.ResumableBatches, "next_batch", crashing_next_batch)
    with pytest.raises(Interrupted):
        run(cfg, run_dir)
    monkeypatch.setattr(batching.ResumableBatches, "next_batch", original)
    return run(cfg, run_dir)


def metric_records(run_dir: Path) -> list[dict[str, Any]]:
    """The parsed lines of ``run_dir/metrics.jsonl``."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load_served(run_dir: Path, trust_remote_code: bool = False) -> torch.nn.Module:
    """The run's ``model/`` as a user loads it, with no project code: ``AutoModelForCausalLM.from_pretrained`` (with
    ``trust_remote_code=True`` where ``summary.json``'s client for it says so: LoRAPrune's per-layer shapes), and
    ``PeftModel.from_pretrained(model, "adapter")`` where ``summary.json`` says ``adapter/`` goes on it (salr)."""
    from transformers import AutoModelForCausalLM

    exports = json.loads((run_dir / "summary.json").read_text())["exports"]
    trust_remote_code = trust_remote_code or "trust_remote_code=True" in exports["model"]["client"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model", trust_remote_code=trust_remote_code)
    if exports["model"].get("serve_with") == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run_dir / "adapter")
    return model.eval()


@contextmanager
def throwaway_method(name: str, schema: type, factory: Callable[..., Any]) -> Iterator[str]:
    """A method registered for one test, as a folder's ``config.py`` would, and as a ``method`` option without a
    YAML (Hydra's ConfigStore); both taken back on exit."""
    register(name, schema=schema, factory=factory)
    ConfigStore.instance().store(group="method", name=name, node=schema)
    try:
        yield name
    finally:
        unregister(name)
        ConfigStore.instance().repo["method"].pop(f"{name}.yaml", None)
