"""The merged export reads bitsandbytes' CPU-repacked 4-bit layout (``models/surgery.dequantized_weight``).

bitsandbytes 0.50 repacks 4-bit weights for its AVX512-BF16 CPU kernel at the first eval-mode forward without
gradients (an evaluation before export does it); transformers' ``model.dequantize()`` cannot read that layout. The
test skips, saying so, on CPUs where bitsandbytes never repacks (no AVX512-BF16): there is nothing to read there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
    model.eval()
    with torch.no_grad():  # the forward that repacks, where the CPU has the kernel
        model(torch.randint(3, 200, (1, 16)))
    repacked = [n for n, m in lora_modules(model).items()
                if getattr(m.base_layer.weight.quant_state, "packing_format_for_cpu", False)]
    if not repacked:
        pytest.skip("bitsandbytes did not repack 4-bit weights on this CPU (no AVX512-BF16 kernel): nothing to read")
    expected = {name: dequantized_weight(m.base_layer) + m.delta_weight().detach() for name, m in
                lora_modules(model).items()}
    save_merged_model(model, tokenizer, tmp_path / "model")
    for name, weight in expected.items():
        torch.testing.assert_close(model.get_submodule(name).weight.float(), weight, atol=1e-5, rtol=0)
