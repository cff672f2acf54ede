"""The LoRA wrapper: math, merge, and parity with PEFT (init, loss, gradients, exported adapter)."""

from __future__ import annotations

import copy

import pytest
import torch
from adapter_helpers import randomize_b
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prunedlora.adapters.lora import LoRALinear, inject_lora, lora_modules, mark_only_lora_as_trainable, merge_lora
from prunedlora.export.peft_adapter import export_peft_adapter

RANK, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj"]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(7))


def test_forward_is_base_plus_scaled_update() -> None:
    base = nn.Linear(6, 5)
    layer = LoRALinear(copy.deepcopy(base), rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    expected = base(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=1e-5)
    layer.rank_mask[1] = 0.0
    a, b = layer.lora_A.weight, layer.lora_B.weight
    masked = base(x) + 2.0 * (x @ a[[0, 2]].T @ b[:, [0, 2]].T)
    torch.testing.assert_close(layer(x), masked, atol=1e-6, rtol=1e-5)
    assert layer.active_rank == 2 and layer.active_indices().tolist() == [0, 2]


def test_zero_b_at_init_gives_the_base_model(tokens: torch.Tensor) -> None:
    model = tiny_llama()
    reference = model(tokens).logits
    inject_lora(model, TARGETS, RANK, ALPHA)
    torch.testing.assert_close(model(tokens).logits, reference)


def test_merge_is_exact_idempotent_and_unmerge_restores() -> None:
    base = nn.Linear(8, 6)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, rank=2, alpha=4.0, use_rslora=True)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    before = layer(x)
    delta = layer.delta_weight()
    torch.testing.assert_close(delta, layer.scaling * layer.lora_B.weight @ layer.lora_A.weight)
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(base.weight, w0 + delta)
    torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)


def test_inject_rejects_unknown_targets() -> None:
    with pytest.raises(ValueError, match="q_proj"):
        inject_lora(tiny_llama(), ["qproj"], RANK, ALPHA)


def test_only_lora_parameters_train() -> None:
    model = tiny_llama()
    names = inject_lora(model, TARGETS, RANK, ALPHA)
    mark_only_lora_as_trainable(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(names) == 4 and len(trainable) == 8
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_parity_with_peft_init_loss_and_gradients(tokens: torch.Tensor) -> None:
    """Same seed -> same A init as peft.LoraConfig, and the same loss and gradients (B randomised alike)."""
    from peft import LoraConfig, get_peft_model

    ours = tiny_llama()
    theirs = copy.deepcopy(ours)
    torch.manual_seed(0)
    inject_lora(ours, TARGETS, RANK, ALPHA)
    mark_only_lora_as_trainable(ours)
    torch.manual_seed(0)
    theirs = get_peft_model(theirs, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0))

    ours_params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    theirs_params = {n.replace("base_model.model.", "").replace(".default", ""): p
                     for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(ours_params) == set(theirs_params)
    for name, param in ours_params.items():
        torch.testing.assert_close(param, theirs_params[name], atol=0, rtol=0)

    for b_random in (False, True):
        if b_random:
            randomize_b(ours)
            randomize_b(theirs)
        ours.zero_grad()
        theirs.zero_grad()
        loss_ours = ours(tokens, labels=tokens).loss
        loss_theirs = theirs(input_ids=tokens, labels=tokens).loss
        loss_ours.backward()
        loss_theirs.backward()
        torch.testing.assert_close(loss_ours, loss_theirs, atol=1e-6, rtol=1e-6)
        for name, param in ours_params.items():
            torch.testing.assert_close(param.grad, theirs_params[name].grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pruned", [False, True])
def test_exported_adapter_reproduces_our_logits_in_peft(tmp_path, tokens: torch.Tensor, pruned: bool) -> None:
    """PeftModel.from_pretrained on the export gives our logits; with pruned ranks, via rank_pattern."""
    from peft import PeftModel

    base = tiny_llama()
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_lora(ours, TARGETS, RANK, ALPHA)
    randomize_b(ours)
    if pruned:  # different active ranks per module, as PrunedLoRA leaves them
        for i, module in enumerate(lora_modules(ours).values()):
            module.rank_mask[: i % RANK] = 0.0
    ranks = export_peft_adapter(ours, tmp_path, "tiny")
    expected_ranks = [RANK - (i % RANK) if pruned else RANK for i in range(4)]
    assert list(ranks.values()) == expected_ranks

    loaded = PeftModel.from_pretrained(base, str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, ours(tokens).logits, atol=1e-5, rtol=0)
        merged_logits = merge_lora(ours)(tokens).logits
        torch.testing.assert_close(merged_logits, loaded(input_ids=tokens).logits, atol=1e-5, rtol=0)
