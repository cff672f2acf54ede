"""Every method's export loads where users serve models, with no project code.

One short recipe run per case on the tiny model, then each exported folder is loaded as its client loads it:

- ``model/`` with plain ``AutoModelForCausalLM.from_pretrained`` (``trust_remote_code`` only where the case says:
  LoRAPrune's per-layer export names its own modelling file); anything else must be a plain ``model_type: llama``;
- the adapter that goes with it with ``PeftModel.from_pretrained``: SALR's ``adapter/`` on ``model/``, the LoRA
  family's ``adapter/`` on the base the run started from;
- SALR's ``compressed/`` with ``load_salr_export``, the one loader of the bitmap form;
- each gives the trained model's logits, and each folder holds no weight file its loader does not read (vLLM
  reads every ``*.safetensors`` of a model folder; transformers reads ``model.safetensors`` or the shards its index
  names, PEFT and vLLM ``adapter_model.safetensors``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from recipe_helpers import METHOD_OVERRIDES, TINY_OVERRIDES, compose_root, load_served
from transformers import AutoModelForCausalLM

from prunedlora.config import RootConfig
from prunedlora.export import weight_files
from prunedlora.export.bitmap import BITMAP_FILE
from prunedlora.methods.salr import load_salr_export
from prunedlora.models.load import load_model
from prunedlora.train import recipe

STEPS = 6  # METHOD_OVERRIDES prune (or allocate) within six steps


@dataclass(frozen=True)
class Deploy:
    """One exported run: the method, its extra overrides, and how its ``model/`` loads."""

    method: str
    overrides: tuple[str, ...] = ()
    remote_code: bool = False
    """``model/`` names its own modelling code (``auto_map``): loaded with ``trust_remote_code=True``."""


ONE_SHOT = ("sparsity.schedule=one_shot", "method.criterion=activation", "method.refit=true",
            "method.calibration_sequences=4")
SPECIAL = {
    "loraprune": {"loraprune-per_layer": Deploy("loraprune", remote_code=True),
                  "loraprune-uniform": Deploy("loraprune", ("method.structure=uniform",)),
                  "loraprune-one_shot-per_layer": Deploy("loraprune", ONE_SHOT, remote_code=True),
                  "loraprune-one_shot-uniform": Deploy("loraprune", (*ONE_SHOT, "method.structure=uniform"))},
}
"""Methods deployed more than one way; every other registered method is one plain case, named after it."""
CASES = {label: case for name in sorted(METHOD_OVERRIDES)
         for label, case in SPECIAL.get(name, {name: Deploy(name)}).items()}


def test_every_registered_method_is_deployed() -> None:
    assert {case.method for case in CASES.values()} == set(METHOD_OVERRIDES)
    assert set(SPECIAL) <= set(METHOD_OVERRIDES), "a special case of a method that is not registered"


def _logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(tokens).logits.float()


def _run(case: Deploy, run_dir: Path, data_root: Path, tokens: torch.Tensor,
         monkeypatch: pytest.MonkeyPatch) -> tuple[torch.Tensor, dict, RootConfig]:
    """Train ``case`` for ``STEPS`` steps into ``run_dir``; returns the logits the model had at export, the summary
    and the config."""
    seen: dict[str, torch.Tensor] = {}
    build = recipe.build_method

    def instrumented(*args, **kwargs):
        method = build(*args, **kwargs)
        export = method.export

        def look_and_export(model, *a, **k):
            seen["trained"] = _logits(model, tokens)
            return export(model, *a, **k)

        method.export = look_and_export
        return method

    monkeypatch.setattr(recipe, "build_method", instrumented)
    cfg = compose_root([*TINY_OVERRIDES, f"method={case.method}", *METHOD_OVERRIDES[case.method], *case.overrides,
                        f"train.max_steps={STEPS}", f"train.save_every={STEPS}"], data_root)
    summary = recipe.run(cfg, run_dir)
    return seen["trained"], summary, cfg


def _read_by_from_pretrained(model_dir: Path) -> set[str]:
    """The weight files ``from_pretrained`` reads: ``model.safetensors``, or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"].values())
    return {"model.safetensors"}


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.slow  # one tiny recipe run per case: seconds
@pytest.mark.parametrize("name", sorted(CASES))
def test_export_loads_with_no_project_code(name: str, data_root: Path, tmp_path: Path, tokens: torch.Tensor,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    case, run_dir = CASES[name], tmp_path / "run"
    trained, summary, cfg = _run(case, run_dir, data_root, tokens, monkeypatch)
    exports = summary["exports"]
    assert set(exports) == {p.name for p in run_dir.iterdir() if p.name in ("model", "adapter", "compressed")}

    # model/: a plain Hugging Face directory (its own modelling code only where the case says so).
    model_dir = run_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert ("auto_map" in config) == case.remote_code
    assert case.remote_code or config["model_type"] == "llama"
    assert {p.name for p in weight_files(model_dir)} == _read_by_from_pretrained(model_dir)
    served = load_served(run_dir, trust_remote_code=case.remote_code)
    torch.testing.assert_close(_logits(served, tokens), trained, atol=1e-4, rtol=0)
    if exports["model"].get("serve_with") != "adapter":  # model/ alone is the trained model: no adapter in it
        plain = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=case.remote_code)
        assert not getattr(plain, "_hf_peft_config_loaded", False)

    # adapter/: the PEFT adapter and nothing else; on the run's base where it does not go on model/.
    adapter_dir = run_dir / "adapter"
    if adapter_dir.is_dir():
        assert [p.name for p in weight_files(adapter_dir)] == ["adapter_model.safetensors"]
        if exports["adapter"]["base"] != "model":
            base, _ = load_model(cfg.model)
            torch.testing.assert_close(_logits(PeftModel.from_pretrained(base, adapter_dir), tokens), trained,
                                       atol=1e-4, rtol=0)

    # compressed/: what load_salr_export reads, all of it.
    compressed = run_dir / "compressed"
    if compressed.is_dir():
        assert sorted(p.name for p in weight_files(compressed)) == ["adapter_model.safetensors", BITMAP_FILE]
        torch.testing.assert_close(_logits(load_salr_export(compressed), tokens), trained, atol=1e-4, rtol=0)
