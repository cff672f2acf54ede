"""Generation from SALR's compressed form (``prunedlora.export.compressed.load_salr_export``).

One salr export of the tiny model (random task adapter, so the adapter matters) is loaded in every base format
and greedy-decoded with transformers' ``generate`` and its KV cache; the tokens must equal those of the dense
``model/`` with ``adapter/`` on top through PEFT (what a server runs), all in float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from prunedlora.adapters.salr import SalrLinear, salr_modules
from prunedlora.config import SparsityConfig, TinyModelConfig
from prunedlora.export.compressed import base_formats, load_salr_export
from prunedlora.kernels import kernel_available
from prunedlora.methods import build_method
from prunedlora.methods.salr import SalrConfig
from prunedlora.models.tiny import build_tiny_llama
from prunedlora.pruning import fused_bitmap
from prunedlora.pruning.bitmap import BitmapLinear
from prunedlora.pruning.fused_bitmap import FusedBitmapLinear

NEW_TOKENS = 12
PROMPT = "Tom has 3 apples and"
ADAPTER_SCALE = 0.03  # at 0.1 the tiny model repeats one token; at 0.03 it differs from the base
MODULE_TYPES = {"fused": FusedBitmapLinear, "bitmap": BitmapLinear, "dense": torch.nn.Linear}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, byte_tokenizer) -> Path:
    """A salr export (every folder) of the tiny model at 50% with a trained-looking task adapter."""
    torch.manual_seed(0)
    model = build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer))
    method = build_method(SalrConfig(residual_rank=4, rank=4, base_criterion="magnitude"), SparsityConfig(final=0.5))
    method.attach(model)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a trained-looking task adapter, small enough that the text stays varied
        for wrapper in salr_modules(model).values():
            wrapper.lora_B.weight.copy_(torch.randn(wrapper.lora_B.weight.shape, generator=gen) * ADAPTER_SCALE)
    out = tmp_path_factory.mktemp("salr_run")
    method.export(model, byte_tokenizer, out, "tiny")
    return out


def greedy(model: torch.nn.Module, prompt: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                              use_cache=use_cache, pad_token_id=0)[0, prompt.shape[1]:]


@pytest.fixture(scope="module")
def prompt(byte_tokenizer) -> torch.Tensor:
    return byte_tokenizer(PROMPT, return_tensors="pt").input_ids


@pytest.fixture(scope="module")
def served_tokens(run_dir: Path, prompt: torch.Tensor) -> torch.Tensor:
    """The reference: the dense ``model/`` with ``adapter/`` through PEFT."""
    base = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32).eval()
    without_adapter = greedy(base, prompt)
    tokens = greedy(PeftModel.from_pretrained(base, str(run_dir / "adapter")).eval(), prompt)
    # An informative reference: the adapter changes the text, which does not collapse to one repeated token.
    assert not torch.equal(tokens, without_adapter) and len(set(tokens.tolist())) > NEW_TOKENS // 3
    return tokens


@pytest.mark.parametrize("base_format", ["auto", "fused", "bitmap", "dense"])
def test_greedy_generation_from_the_compressed_form_equals_the_served_model(
        base_format: str, run_dir: Path, prompt: torch.Tensor, served_tokens: torch.Tensor) -> None:
    model = load_salr_export(run_dir / "compressed", base_format=base_format)
    bases = [w.base_layer for w in salr_modules(model).values()]
    assert len(bases) == 14
    if base_format != "auto":
        assert all(type(b) is MODULE_TYPES[base_format] for b in bases)
    assert sum(base_formats(model).values()) == 14
    assert not any(p.device.type == "meta" for p in model.parameters())
    torch.testing.assert_close(greedy(model, prompt), served_tokens, rtol=0, atol=0)


def test_generation_uses_the_kv_cache_and_the_fused_kernel_per_token(run_dir: Path, prompt: torch.Tensor,
                                                                      served_tokens: torch.Tensor,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """With the cache every step after the prompt feeds one token to each linear, and those steps run the fused
    kernel (the prompt, longer than ``max_fused_tokens``, runs tiled decode + GEMM); without the cache every step
    feeds the whole sequence. Both give the same tokens."""
    if not kernel_available():
        pytest.skip("the fused bitmap kernel did not build here (no C++ compiler with OpenMP): nothing to count")
    model = load_salr_export(run_dir / "compressed", base_format="fused")
    seen: list[int] = []
    first = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(first, SalrLinear)
    first.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2]))
    kernel_calls = []
    real = fused_bitmap.bitmap_matmul
    monkeypatch.setattr(fused_bitmap, "bitmap_matmul", lambda *a, **k: kernel_calls.append(1) or real(*a, **k))
    cached = greedy(model, prompt, use_cache=True)
    length = prompt.shape[1]
    assert seen == [length] + [1] * (NEW_TOKENS - 1)
    assert len(kernel_calls) == 14 * (NEW_TOKENS - 1)  # every pruned linear, every one-token step
    seen.clear()
    uncached = greedy(model, prompt, use_cache=False)
    assert seen == list(range(length, length + NEW_TOKENS))
    torch.testing.assert_close(cached, uncached, rtol=0, atol=0)
    torch.testing.assert_close(cached, served_tokens, rtol=0, atol=0)


def test_the_bare_compressed_base_takes_the_adapter_through_peft(run_dir: Path, prompt: torch.Tensor,
                                                                 served_tokens: torch.Tensor) -> None:
    bare = load_salr_export(run_dir / "compressed", with_adapter=False)
    assert not salr_modules(bare)
    model = PeftModel.from_pretrained(bare, str(run_dir / "compressed")).eval()
    torch.testing.assert_close(greedy(model, prompt), served_tokens, rtol=0, atol=0)


def test_load_salr_export_refuses_an_unknown_base_format(run_dir: Path) -> None:
    with pytest.raises(ValueError, match="base_format='sparse' is not one of"):
        load_salr_export(run_dir, base_format="sparse")
