"""Every method on a bitsandbytes nf4 base (CPU): it trains and exports, or says clearly why not."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from recipe_helpers import TINY_OVERRIDES, compose_root

from prunedlora.config import ConfigError, RootConfig
from prunedlora.methods import METHODS
from prunedlora.train.recipe import run

# Methods that edit base weights in place cannot prune packed 4-bit weights (stack.md §5); they must refuse
# with an error that names the quantization, not crash. (SALR prunes the float base, then quantizes it.)
REFUSES_QUANTIZED: set[str] = set()


def _cfg(method: str, data_root: Path) -> RootConfig:
    cfg = compose_root([*TINY_OVERRIDES, f"method={method}", "model.quantization=nf4", "train.optimizer=adamw8bit"],
                       data_root)
    extra = {"adalora": 40, "prunedlora": 20, "loraprune": 20}.get(method, 3)
    return replace(cfg, train=replace(cfg.train, max_steps=extra, save_every=1000))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_on_an_nf4_base(method: str, tmp_path: Path, data_root: Path) -> None:
    cfg = _cfg(method, data_root)
    if method in REFUSES_QUANTIZED:
        with pytest.raises(ConfigError, match="quantiz"):
            run(cfg, tmp_path)
        return
    summary = run(cfg, tmp_path)
    assert summary["final_loss"] is not None and summary["final_loss"] == summary["final_loss"]  # not NaN
    assert (tmp_path / "model" / "config.json").is_file()
    if method == "loraprune":
        return
    if method == "salr":  # pruned in float, then quantized: every pruned zero survives; NF4 rounds a few small
        assert 0.5 <= summary["sparsity"] < 0.53  # kept weights to its zero code as well
        return
    # The merged float export equals the nf4 base + the exported adapter (the QLoRA deployment pair).
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunedlora.models.load import load_model

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    for dequantize, atol in ((True, 1e-5), (False, 2e-2)):  # bnb's CPU 4-bit kernel differs by ~1e-3
        base, _ = load_model(cfg.model)
        if dequantize:
            base.dequantize()
        with_adapter = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
        with torch.no_grad():
            torch.testing.assert_close(merged(ids).logits, with_adapter(input_ids=ids).logits, atol=atol, rtol=0)
