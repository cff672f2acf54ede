"""Layer-by-layer calibration (``pruning/sequential.py``) against the one-pass statistics of ``calibration.py``."""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from prunedlora.pruning.calibration import collect_input_stats
from prunedlora.pruning.sequential import calibrate_layer_by_layer, capture_layer_inputs

VOCAB = 97
PROJECTIONS = ("q_proj", "k_proj", "o_proj", "gate_proj", "down_proj")


def tiny_llama(layers: int = 3) -> LlamaForCausalLM:
    torch.manual_seed(123)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


ROWS = torch.randint(0, VOCAB, (5, 16), generator=torch.Generator().manual_seed(0))


def one_pass(model: LlamaForCausalLM, layer: int) -> dict:
    """``collect_input_stats`` of one layer's projections, keyed by projection name."""
    block = model.model.layers[layer]
    modules = {name: block.self_attn.get_submodule(name) if name in ("q_proj", "k_proj", "o_proj")
               else block.mlp.get_submodule(name) for name in PROJECTIONS}
    return collect_input_stats(model, modules, ROWS, gram=True, batch_size=2)


def assert_same_stats(got: dict, expected: dict) -> None:
    for name in PROJECTIONS:
        assert got[name].tokens == expected[name].tokens == ROWS.numel()
        torch.testing.assert_close(got[name].sq_norm, expected[name].sq_norm, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[name].gram, expected[name].gram, rtol=1e-5, atol=1e-5)


def run(model: LlamaForCausalLM, callback, **kwargs) -> list[int]:
    return calibrate_layer_by_layer(model, ROWS, PROJECTIONS, callback, gram=True, batch_size=2, **kwargs)


@pytest.mark.parametrize("propagate", [True, False])
def test_an_unchanged_model_gets_the_one_pass_statistics_layer_by_layer_in_order(propagate: bool) -> None:
    model = tiny_llama()
    expected = {i: one_pass(model, i) for i in range(3)}
    seen = []

    def on_layer(index, layer, stats):
        assert layer is model.model.layers[index]
        assert stats["k_proj"] is stats["q_proj"]  # one input, one statistic
        assert_same_stats(stats, expected[index])
        seen.append(index)

    assert run(model, on_layer, propagate=propagate) == [0, 1, 2]
    assert seen == [0, 1, 2]
    assert run(model, lambda i, layer, stats: seen.append(i), layers=[2, 1]) == [1, 2] and seen[3:] == [1, 2]


def zero_heads(layer: torch.nn.Module) -> None:
    """Prune heads 0-1 of a layer the structured way: their o_proj columns go to zero."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight[:, :16] = 0.0


@pytest.mark.parametrize("propagate", [True, False])
def test_a_change_in_a_layer_reaches_the_next_layers_inputs_only_when_propagating(propagate: bool) -> None:
    model = tiny_llama()
    dense = one_pass(model, 1)
    changed = copy.deepcopy(model)
    zero_heads(changed.model.layers[0])
    pruned = one_pass(changed, 1)  # what layer 1 sees once layer 0 is pruned

    def on_layer(index, layer, stats):
        if index == 0:
            zero_heads(layer)
        else:
            assert_same_stats(stats, pruned if propagate else dense)

    run(model, on_layer, propagate=propagate, layers=[0, 1])
    assert not torch.allclose(pruned["down_proj"].gram, dense["down_proj"].gram)  # the check above can tell


def test_a_callback_that_changed_nothing_saves_the_second_forward() -> None:
    model = tiny_llama(layers=2)
    calls = []
    model.model.layers[1].register_forward_pre_hook(lambda module, args: calls.append(1))
    run(model, lambda i, layer, stats: False)
    assert len(calls) == 3  # 3 batches of 2 rows, once
    calls.clear()
    run(model, lambda i, layer, stats: None)  # None: maybe changed
    assert len(calls) == 6


def test_each_layers_statistics_are_freed_before_the_next_layer() -> None:
    model = tiny_llama()
    grams, alive_at = [], []

    def on_layer(index, layer, stats):
        alive_at.append([ref() is not None for ref in grams])
        grams.append(weakref.ref(stats["down_proj"].gram))

    run(model, on_layer)
    assert alive_at == [[], [False], [False, False]]


def test_layer_zero_inputs_are_the_embeddings_and_the_call_arguments_reproduce_the_model() -> None:
    model = tiny_llama(layers=2)
    cache = capture_layer_inputs(model, ROWS, batch_size=2)
    assert [hidden.shape[0] for hidden, _ in cache] == [2, 2, 1]
    assert cache[1][1]["position_embeddings"] is cache[0][1]["position_embeddings"]  # held once, not per batch
    torch.testing.assert_close(cache[0][0], model.model.embed_tokens(ROWS[:2]))
    expected = model(ROWS, output_hidden_states=True).hidden_states[-1]  # the decoder's output (final norm applied)
    layers = model.model.layers
    got = model.model.norm(torch.cat([layers[1](layers[0](hidden, **kwargs), **kwargs) for hidden, kwargs in cache]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_layer_indices_outside_the_model_are_refused() -> None:
    with pytest.raises(ValueError, match="outside the model's 2 decoder layers"):
        calibrate_layer_by_layer(tiny_llama(layers=2), ROWS, PROJECTIONS, lambda *a: None, gram=False, layers=[2])
