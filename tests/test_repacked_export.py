"""The merged export reads bitsandbytes' CPU-repacked 4-bit layout (``models/surgery.dequantized_weight``).

bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first eval-mode forward without
gradients (an evaluation before export does it); transformers' ``model.dequantize()`` cannot read that layout and
bitsandbytes' own way back misorders the block scales. Where the CPU has no such kernel, the layers the forward
left alone are repacked by calling bitsandbytes' repack directly (``bnb_layouts.repack``), so the test runs on
every CPU: the export must equal the weights as they were before the repack, up to its bf16 block scales.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from bnb_layouts import four_bit_layers, repack
from recipe_helpers import compose_root

from prunedlora.adapters.lora import inject_lora, lora_modules, mark_only_lora_as_trainable
from prunedlora.export import save_merged_model
from prunedlora.models.load import load_model
from prunedlora.models.surgery import dequantized_weight


def test_merged_export_after_a_repacking_forward_equals_base_plus_adapter(tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    model, tokenizer = load_model(compose_root(["model=tiny", "model.quantization=nf4"]).model)
    inject_lora(model, ["q_proj", "v_proj"], 4, 8.0)
    mark_only_lora_as_trainable(model)
    for layer in lora_modules(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    before = {name: dequantized_weight(m) for name, m in four_bit_layers(model).items()}  # standard layout
    model.eval()
    with torch.no_grad():  # the forward that repacks, where the CPU has the kernel
        model(torch.randint(3, 200, (1, 16)))
    assert sorted(repack(model)) == sorted(before)  # the rest repacked directly: every 4-bit linear is repacked
    deltas = {name: m.delta_weight().detach() for name, m in lora_modules(model).items()}
    save_merged_model(model, tokenizer, tmp_path / "model")
    for name, delta in deltas.items():  # the base part within the repack's bf16 rounding of the block scales
        base = model.get_submodule(name).weight.float() - delta
        torch.testing.assert_close(base, before[f"{name}.base_layer"], rtol=2**-8, atol=1e-6)
