"""Held-out answer loss (``eval/heldout.py``) and per-task evaluation limits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prunedlora.config import ConfigError, DataConfig, EvalConfig, TinyModelConfig
from prunedlora.data.batching import tokenize_examples
from prunedlora.data.datasets import load_records
from prunedlora.data.formatting import format_example
from prunedlora.eval import runner
from prunedlora.eval.heldout import answer_nll, heldout_loss
from prunedlora.models.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny(byte_tokenizer):
    return build_tiny_llama(TinyModelConfig(max_position_embeddings=1024), vocab_size=len(byte_tokenizer)).eval()


def test_heldout_loss_is_the_training_loss_on_test_examples(tiny, byte_tokenizer, data_root):
    data = DataConfig(root=str(data_root))
    out = heldout_loss(tiny, byte_tokenizer, "gsm8k", data, limit=3, seqlen=1024, batch_size=2, progress=False)
    # Reference: the model's own (HF) loss, one example at a time, weighted by its answer tokens.
    records = load_records("gsm8k", "test", data)[:3]
    rows = tokenize_examples([format_example("gsm8k", r) for r in records], byte_tokenizer, 1024)
    total, tokens, per_example = 0.0, 0, []
    with torch.no_grad():
        for row in rows:
            ids, labels = torch.tensor([row["input_ids"]]), torch.tensor([row["labels"]])
            n = int((labels[0, 1:] != -100).sum())
            nll = float(tiny(input_ids=ids, labels=labels).loss) * n
            total, tokens = total + nll, tokens + n
            per_example.append((nll, n))
    assert out["n"] == 3 and out["n_tokens"] == tokens
    assert out["loss"] == pytest.approx(total / tokens, rel=1e-5)
    assert out["ppl"] == pytest.approx(math.exp(total / tokens), rel=1e-5)
    loss = total / tokens
    se = math.sqrt(3 / 2 * sum((s - loss * c) ** 2 for s, c in per_example)) / tokens
    assert out["loss_stderr"] == pytest.approx(se, rel=1e-3)  # a difference of near-equal sums


def test_answer_nll_does_not_depend_on_padding(tiny, byte_tokenizer):
    pairs = [("Q: 1+1?\nA:", " 2"), ("Q: a longer question here?\nA:", " a longer answer with more tokens")]
    rows = tokenize_examples(pairs, byte_tokenizer, 256)
    pad = byte_tokenizer.pad_token_id
    one_by_one = answer_nll(tiny, rows, pad, batch_size=1, progress=False)
    batched = answer_nll(tiny, rows, pad, batch_size=2, progress=False)
    assert [c for _, c in batched] == [c for _, c in one_by_one]
    assert all(c > 0 for _, c in batched)
    for (a, _), (b, _) in zip(batched, one_by_one, strict=True):
        assert a == pytest.approx(b, rel=1e-4)


def test_task_limits_override_limit_per_task(tiny, byte_tokenizer, data_root, tmp_path):
    cfg = EvalConfig(limit=2, task_limits={"gsm8k_loss": 3}, seqlen=512, batch_size=2)
    res = runner.evaluate(tiny, byte_tokenizer, ["gsm8k_loss", "ptb"], cfg, DataConfig(root=str(data_root)),
                          tmp_path, model_id="tiny", progress=False)
    assert set(res["gsm8k_loss"]) == {"loss", "ppl"}
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert doc["settings"]["gsm8k_loss"]["n"] == 3 and doc["settings"]["gsm8k_loss"]["limit"] == 3
    assert doc["settings"]["ptb"]["n"] == 2 and doc["settings"]["ptb"]["limit"] == 2
    assert doc["stderr"]["gsm8k_loss"]["loss"] > 0


def test_task_limits_are_validated_before_anything_runs():
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException
    from omegaconf import OmegaConf

    from prunedlora.compose import register_configs
    from prunedlora.config import EVAL_TASKS
    from prunedlora.validation import validate

    assert set(EVAL_TASKS) == set(runner.EVALUATORS)  # the config's list of tasks is the evaluators'
    register_configs()
    with initialize_config_module(version_base="1.3", config_module="prunedlora.configs"):
        with pytest.raises(ConfigCompositionException, match="task_limits"):  # a misspelt task
            compose("config", overrides=["model=tiny", "eval.task_limits={gsm8k_lose:3}"])
        cfg = OmegaConf.to_object(compose("config", overrides=["model=tiny", "eval.task_limits.mmlu=0"]))
    with pytest.raises(ConfigError, match=r"eval.task_limits.mmlu=0 must be >= 1"):
        validate(cfg)
