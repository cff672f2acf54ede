"""Evaluation: answer extraction, token-level perplexity math, GSM8K scoring and the runner's files."""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from prunedlora.config import ConfigError, DataConfig, EvalConfig, TinyModelConfig
from prunedlora.eval import runner
from prunedlora.eval.gsm8k import (
    answers_match,
    build_prompt,
    extract_flexible,
    extract_strict,
    gsm8k_exact_match,
    normalize_number,
    truncate_at_stop,
)
from prunedlora.eval.perplexity import make_windows, token_perplexity, tokenize_text
from prunedlora.models.tiny import BOS_ID, build_byte_tokenizer, build_tiny_llama

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40).strip()  # 1799 chars -> 1800 tokens with BOS
RECORDS = [
    {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"},
    {"question": "How many apples?", "answer": "She has 1,000 apples.\n#### 1,000"},
]


def _mirror() -> Path:
    return Path(os.environ.get("PRUNEDLORA_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))


@pytest.fixture(scope="module")
def tok():
    return build_byte_tokenizer()


@pytest.fixture(scope="module")
def tiny(tok):
    return build_tiny_llama(TinyModelConfig(), vocab_size=len(tok))


class UniformLM(torch.nn.Module):
    """Logits all zero: every next token has probability 1/V."""

    def __init__(self, vocab: int, max_pos: int = 100_000):
        super().__init__()
        self.vocab = vocab
        self.config = SimpleNamespace(max_position_embeddings=max_pos)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab) + self.dummy)


class CountingTokenizer:
    def __init__(self, tok):
        self.tok, self.calls = tok, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)


# ---------------------------------------------------------------------------------------- extraction
def test_extract_strict():
    assert extract_strict("so 1000 + 234 = 1234\n#### 1,234") == "1234"
    assert extract_strict("#### 5.") == "5"
    assert extract_strict("#### 12\n\n#### 13") == "12"  # the first one, as lm-eval's take_first
    assert extract_strict("#### -3") == "-3"
    assert extract_strict("The answer is 42.") is None
    assert extract_strict("no numbers here") is None


def test_extract_flexible():
    assert extract_flexible("The answer is 42.") == "42"
    assert extract_flexible("first 3 then 7, finally $1,250.") == "1250"
    assert extract_flexible("x = -8") == "-8"
    assert extract_flexible("no number at all...") is None
    assert extract_flexible("") is None
    assert extract_flexible("it is 12...") == "12"  # a trailing ellipsis does not hide the number


def test_normalize_and_match():
    assert normalize_number("1,000") == "1000"
    assert normalize_number(" $1,000. ") == "1000"
    assert normalize_number("5.0") == "5"
    assert normalize_number("0.50") == "0.5"
    assert normalize_number("-0") == "0"
    assert normalize_number("Abc") == "abc"
    assert answers_match("5", "5.00") and answers_match("1000", "1000")
    assert not answers_match("4", "5") and not answers_match(None, "5")
    assert answers_match("abc", "ABC")


def test_prompt_format_and_stop():
    p = build_prompt("Q2?", [{"question": "Q1?", "answer": "A1\n#### 1"}])
    assert p == "Question: Q1?\nAnswer: A1\n#### 1\n\nQuestion: Q2?\nAnswer:"
    assert truncate_at_stop(" 4\n#### 4\n\nQuestion: x", ("Question:", "\n\n")) == " 4\n#### 4"
    assert truncate_at_stop("abc", ("Question:",)) == "abc"


# ---------------------------------------------------------------------------------------- perplexity
def test_uniform_logits_give_vocab_size():
    V = 1000  # any V above the tokenizer's largest id (258)
    out = token_perplexity(UniformLM(V), build_byte_tokenizer(), TEXT, seqlen=64, batch_size=4, progress=False)
    assert out["ppl"] == pytest.approx(V, abs=1e-3)
    assert out["nll"] == pytest.approx(math.log(V), abs=1e-6)
    assert all(type(out[k]) is float for k in ("ppl", "nll"))
    assert all(type(out[k]) is int for k in ("n_windows", "n_tokens", "seqlen"))


def _reference_nll(model, ids: torch.Tensor, seqlen: int, n: int) -> float:
    total = 0.0
    with torch.no_grad():
        for w in range(n):
            x = ids[w * seqlen : (w + 1) * seqlen]
            logp = torch.log_softmax(model(input_ids=x[None]).logits[0].double(), dim=-1)
            for t in range(seqlen - 1):  # deliberately the slow, obvious way
                total -= logp[t, x[t + 1]].item()
    return total / (n * (seqlen - 1))


def test_matches_reference_and_batching(tiny, tok):
    seqlen, limit = 50, 7
    ids = tokenize_text(tok, TEXT)
    ref = _reference_nll(tiny, ids, seqlen, limit)
    b1 = token_perplexity(tiny, tok, TEXT, seqlen=seqlen, batch_size=1, limit=limit, progress=False)
    b3 = token_perplexity(tiny, tok, TEXT, seqlen=seqlen, batch_size=3, limit=limit, progress=False)
    assert b1["n_windows"] == b3["n_windows"] == limit
    assert b1["n_tokens"] == limit * (seqlen - 1)
    assert b1["nll"] == pytest.approx(ref, rel=1e-5)
    assert b3["nll"] == pytest.approx(b1["nll"], rel=1e-5)
    assert b3["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_window_count_limit_and_cap(tiny, tok):
    numel = len(TEXT.encode()) + 1  # byte tokenizer + one BOS
    assert tokenize_text(tok, TEXT).numel() == numel
    out = token_perplexity(tiny, tok, TEXT, seqlen=128, batch_size=4, progress=False)
    assert out["n_windows"] == numel // 128 and out["seqlen"] == 128
    assert token_perplexity(tiny, tok, TEXT, seqlen=128, limit=3, progress=False)["n_windows"] == 3
    assert token_perplexity(tiny, tok, TEXT, seqlen=128, limit=10_000, progress=False)["n_windows"] == numel // 128
    # the window is capped at max_position_embeddings (512 for the tiny model)
    capped = token_perplexity(tiny, tok, TEXT, seqlen=4096, limit=1, progress=False)
    assert capped["seqlen"] == 512 and capped["n_windows"] == 1
    assert make_windows(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ConfigError, match="seqlen"):
        token_perplexity(UniformLM(5), tok, "short", seqlen=64, progress=False)


def test_single_tokenization_single_bos(tiny, tok):
    counting = CountingTokenizer(tok)
    token_perplexity(tiny, counting, TEXT, seqlen=64, batch_size=4, limit=5, progress=False)
    assert counting.calls == 1
    ids = tokenize_text(tok, TEXT)
    assert ids[0].item() == BOS_ID and int((ids == BOS_ID).sum()) == 1


def test_training_mode_restored(tiny, tok):
    tiny.train()
    token_perplexity(tiny, tok, TEXT, seqlen=64, limit=1, progress=False)
    assert tiny.training
    tiny.eval()
    token_perplexity(tiny, tok, TEXT, seqlen=64, limit=1, progress=False)
    assert not tiny.training


# --------------------------------------------------------------------------------------------- gsm8k
def test_gsm8k_runs_on_tiny_model(tiny, tok):
    side = tok.padding_side
    out = gsm8k_exact_match(tiny, tok, RECORDS, fewshot=RECORDS[:1], max_gen_toks=8, batch_size=2,
                            progress=False)
    assert out["n"] == 2 and len(out["samples"]) == 2
    assert 0.0 <= out["exact_match_strict"] <= 1.0 and 0.0 <= out["exact_match_flexible"] <= 1.0
    assert tok.padding_side == side
    assert {"question", "gold", "generation", "pred"} <= set(out["samples"][0])
    assert out["samples"][1]["gold"] == "1000"


def _fake_generate(tok, reply):
    """A ``generate`` that answers each prompt with ``reply(gold_answer)`` followed by junk past a stop."""
    gold = {r["question"]: r["answer"] for r in RECORDS}

    def generate(input_ids, attention_mask=None, max_new_tokens=None, **kwargs):
        rows = []
        for row in input_ids.tolist():
            prompt = tok.decode(row, skip_special_tokens=True)
            q = re.findall(r"Question: (.*?)\nAnswer:", prompt)[-1]
            rows.append(tok(" " + reply(gold[q]) + "\n\nQuestion: junk #### 999", add_special_tokens=False)["input_ids"])
        width = max(map(len, rows))
        new = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], dim=1)

    return generate


@pytest.mark.parametrize(
    "reply, strict, flexible",
    [
        (lambda a: a, 1.0, 1.0),  # the gold text itself, "#### N" included
        (lambda a: "The answer is " + a.split("#### ")[-1] + ".", 0.0, 1.0),  # no "####": only flexible
        (lambda a: "#### 7", 0.0, 0.0),
    ],
)
def test_gsm8k_scoring_with_fake_generate(tiny, tok, monkeypatch, reply, strict, flexible):
    monkeypatch.setattr(tiny, "generate", _fake_generate(tok, reply))
    out = gsm8k_exact_match(tiny, tok, RECORDS, fewshot=[], max_gen_toks=8, batch_size=2, progress=False)
    assert out["exact_match_strict"] == strict and out["exact_match_flexible"] == flexible
    assert all("junk" not in s["generation"] for s in out["samples"])


# -------------------------------------------------------------------------------------------- runner
def _check_results_dir(out_dir: Path, tasks):
    doc = json.loads((out_dir / "eval" / "results.json").read_text())
    assert doc["model_id"] == "tiny" and doc["timestamp"]
    assert set(doc["results"]) == set(tasks) == set(doc["settings"])
    for task in tasks:
        assert all(type(v) is float for v in doc["results"][task].values())
        s = doc["settings"][task]
        assert {"n", "n_shot", "seqlen", "limit", "split"} <= set(s) and type(s["n"]) is int
    md = (out_dir / "eval" / "results.md").read_text()
    assert "| task | metric | value | n |" in md
    return doc


def test_runner_writes_files(tiny, tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_load_records", lambda ds, split, data, path=None: list(RECORDS))
    monkeypatch.setattr(runner, "_load_lm_text", lambda ds, split, data, path=None: TEXT)
    cfg = EvalConfig(limit=2, seqlen=64, batch_size=2, num_fewshot=1, max_gen_toks=4)
    res = runner.evaluate(tiny, tok, ["wikitext2", "gsm8k"], cfg, DataConfig(), tmp_path, model_id="tiny",
                          progress=False)
    assert set(res) == {"wikitext2", "gsm8k"} and set(res["wikitext2"]) == {"ppl", "nll"}
    doc = _check_results_dir(tmp_path, ["wikitext2", "gsm8k"])
    assert doc["settings"]["wikitext2"]["n"] == 2 and doc["settings"]["gsm8k"]["n_shot"] == 1
    lines = (tmp_path / "eval" / "samples_gsm8k.jsonl").read_text().splitlines()
    assert len(lines) == 2 and "generation" in json.loads(lines[0])
    assert "samples" not in json.dumps(doc)
    assert "| wikitext2 | ppl |" in capsys.readouterr().out
    # a second evaluation keeps the first results instead of overwriting them
    runner.evaluate(tiny, tok, ["ptb"], cfg, DataConfig(), tmp_path, model_id="tiny", progress=False)
    assert len(list((tmp_path / "eval").glob("results.prev-*.json"))) == 1


def test_runner_unknown_and_planned_tasks(tiny, tok, tmp_path):
    cfg = EvalConfig()
    with pytest.raises(ConfigError, match=r"unknown task 'nope'.*gsm8k.*ptb.*wikitext2"):
        runner.evaluate(tiny, tok, ["wikitext2", "nope"], cfg, DataConfig(), tmp_path, model_id="tiny")
    with pytest.raises(ConfigError, match=r"mmlu"):
        runner.evaluate(tiny, tok, ["mmlu"], cfg, DataConfig(), tmp_path, model_id="tiny")
    assert runner.evaluate(tiny, tok, [], cfg, DataConfig(), tmp_path, model_id="tiny") == {}
    assert not (tmp_path / "eval").exists()  # nothing ran, nothing written


def test_format_results_table():
    table = runner.format_results_table({"results": {"ptb": {"ppl": 12.3456789}}, "settings": {"ptb": {"n": 3}}})
    assert table.splitlines()[2] == "| ptb | ppl | 12.3457 | 3 |"
    assert "| gsm8k | exact_match_strict | 0.5000 |  |" in runner.format_results_table(
        {"gsm8k": {"exact_match_strict": 0.5}}
    )


@pytest.mark.skipif(not _mirror().is_dir(), reason="local data mirror not present")
def test_runner_on_mirror_data(tiny, tok, tmp_path):
    cfg = EvalConfig(limit=2, seqlen=128, batch_size=2, num_fewshot=1, max_gen_toks=4)
    data = DataConfig(root=str(_mirror()), hub=False)
    res = runner.evaluate(tiny, tok, ["wikitext2", "ptb", "gsm8k"], cfg, data, tmp_path, model_id="tiny",
                          progress=False)
    doc = _check_results_dir(tmp_path, ["wikitext2", "ptb", "gsm8k"])
    assert doc["settings"]["ptb"]["n"] == 2 and doc["settings"]["gsm8k"]["n"] == 2
    assert res["wikitext2"]["ppl"] > 1.0 and math.isfinite(res["ptb"]["ppl"])


def test_gsm8k_generation_stops_at_stop_string(tok):
    """A model that always emits "\\n" stops after "\\n\\n" instead of running to max_gen_toks."""
    model = build_tiny_llama(TinyModelConfig(), vocab_size=len(tok))
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    model.lm_head.register_forward_hook(lambda mod, args, out: out + 100.0 * F.one_hot(
        torch.tensor(newline), out.shape[-1]).to(out.dtype))
    shapes = []
    real = model.generate

    def spy(input_ids, **kwargs):
        out = real(input_ids=input_ids, **kwargs)
        shapes.append(out.shape[1] - input_ids.shape[1])
        return out

    model.generate = spy
    out = gsm8k_exact_match(model, tok, RECORDS, fewshot=[], max_gen_toks=50, batch_size=2, progress=False)
    assert shapes == [2] and out["samples"][0]["generation"] == ""
