"""LoRAPrune's calibrated ``activation`` scores (``pruning/activation_scores.py``) on small tensors and a tiny LLaMA."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunedlora.adapters.lora import LoRALinear
from prunedlora.pruning.activation_scores import (
    activation_channel_scores,
    activation_head_scores,
    activation_layer_scores,
    column_scores,
)
from prunedlora.pruning.calibration import collect_input_stats
from prunedlora.pruning.structure import AttentionShape, attach_structure_masks

SHAPE = AttentionShape(num_heads=4, num_kv_heads=2, head_dim=3)


def test_a_column_scores_its_input_norm_times_its_weight_norm() -> None:
    weight = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, 0.0]])
    x = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])  # (tokens, d_in)
    sq_norm = x.square().sum(0)  # 3, 2, 0
    expected = torch.tensor([5.0 * 3 ** 0.5, 2.0 * 2 ** 0.5, 0.0])
    torch.testing.assert_close(column_scores(weight, sq_norm), expected)
    torch.testing.assert_close(column_scores(weight, sq_norm, power=2), expected.square())
    torch.testing.assert_close(activation_channel_scores(weight, sq_norm), expected / expected.norm(), atol=1e-6,
                               rtol=1e-6)


@pytest.mark.parametrize("power", [1, 2])
def test_heads_sum_their_columns_and_kv_groups_sum_their_heads(power: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 12, generator=gen)  # o_proj of 4 heads of dim 3
    sq_norm = torch.rand(12, generator=gen) * 10
    per_column = (weight.norm(dim=0) * sq_norm.sqrt()) ** power
    per_head = per_column.view(4, 3).sum(1)
    torch.testing.assert_close(activation_head_scores(weight, sq_norm, SHAPE, power), per_head / per_head.norm())
    per_group = per_head.view(2, 2).sum(1)  # query heads 0-1 share KV head 0, 2-3 share KV head 1
    torch.testing.assert_close(activation_head_scores(weight, sq_norm, SHAPE, power, policy="kv_group"),
                               per_group / per_group.norm())


def test_norms_of_another_input_are_refused() -> None:
    with pytest.raises(ValueError, match="input columns"):
        column_scores(torch.zeros(5, 12), torch.ones(8))


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_layer_scores_read_the_effective_weights_and_the_masked_inputs() -> None:
    model = tiny_llama()
    layer = model.model.layers[1]
    layer.mlp.down_proj = LoRALinear(layer.mlp.down_proj, rank=2, alpha=4.0)
    torch.nn.init.normal_(layer.mlp.down_proj.lora_B.weight)  # a trained adapter: W~ differs from W0
    mask = attach_structure_masks(model, [1])[1]
    mask.head_mask[2] = 0.0  # head 2 already removed
    mask.channel_mask[[5, 9]] = 0.0
    rows = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(1))
    targets = {"o_proj": layer.self_attn.o_proj, "down_proj": layer.mlp.down_proj}
    seen = {name: [] for name in targets}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=name: seen[n].append(args[0].detach()))
               for name, m in targets.items()]
    stats = collect_input_stats(model, targets, rows, gram=False)
    for handle in handles:
        handle.remove()
    scores = activation_layer_scores(layer, stats, heads=True, channels=True)

    x_down = torch.cat([t.reshape(-1, 64) for t in seen["down_proj"]])
    w_down = layer.mlp.down_proj.base_layer.weight + layer.mlp.down_proj.delta_weight()
    channels = w_down.detach().norm(dim=0) * x_down.norm(dim=0)
    torch.testing.assert_close(scores["channels"], channels / channels.norm(), rtol=1e-5, atol=1e-6)
    assert scores["channels"][[5, 9]].abs().max() == 0  # removed channels see zero inputs
    x_o = torch.cat([t.reshape(-1, 32) for t in seen["o_proj"]])
    heads = (layer.self_attn.o_proj.weight.detach().norm(dim=0) * x_o.norm(dim=0)).view(4, 8).sum(1)
    torch.testing.assert_close(scores["heads"], heads / heads.norm(), rtol=1e-5, atol=1e-6)
    assert scores["heads"][2] == 0

    assert activation_layer_scores(layer, {}, heads=True, channels=False) == {"heads": None}
