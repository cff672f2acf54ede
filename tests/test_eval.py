"""Evaluation: token-level perplexity math and speed path, the runner's files, prunedlora-eval loading, wandb."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from prunedlora.config import ConfigError, DataConfig, EvalConfig, TinyModelConfig
from prunedlora.eval import runner
from prunedlora.eval.perplexity import make_windows, token_perplexity, tokenize_text
from prunedlora.models.tiny import BOS_ID, build_byte_tokenizer, build_tiny_llama

TEXT = ("The quick brown fox jumps over the lazy dog. " * 40).strip()  # 1799 chars -> 1800 tokens with BOS


def _mirror() -> Path:
    return Path(os.environ.get("PRUNEDLORA_DATA_ROOT", Path(__file__).resolve().parents[2] / "shared" / "data"))


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
    def __init__(self, byte_tokenizer):
        self.byte_tokenizer, self.calls = byte_tokenizer, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.byte_tokenizer(*args, **kwargs)


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


def test_matches_reference_and_batching(tiny, byte_tokenizer):
    seqlen, limit = 50, 7
    ids = tokenize_text(byte_tokenizer, TEXT)
    ref = _reference_nll(tiny, ids, seqlen, limit)
    b1 = token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=seqlen, batch_size=1, limit=limit, progress=False)
    b3 = token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=seqlen, batch_size=3, limit=limit, progress=False)
    assert b1["n_windows"] == b3["n_windows"] == limit
    assert b1["n_tokens"] == limit * (seqlen - 1)
    assert b1["nll"] == pytest.approx(ref, rel=1e-5)
    assert b3["nll"] == pytest.approx(b1["nll"], rel=1e-5)
    assert b3["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)


def test_window_count_limit_and_cap(tiny, byte_tokenizer):
    numel = len(TEXT.encode()) + 1  # byte tokenizer + one BOS
    assert tokenize_text(byte_tokenizer, TEXT).numel() == numel
    out = token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=128, batch_size=4, progress=False)
    assert out["n_windows"] == numel // 128 and out["seqlen"] == 128
    assert token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=128, limit=3, progress=False)["n_windows"] == 3
    all_windows = token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=128, limit=10_000, progress=False)
    assert all_windows["n_windows"] == numel // 128
    # the window is capped at max_position_embeddings (512 for the tiny model)
    capped = token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=4096, limit=1, progress=False)
    assert capped["seqlen"] == 512 and capped["n_windows"] == 1
    assert make_windows(torch.arange(10), 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ConfigError, match="seqlen"):
        token_perplexity(UniformLM(5), byte_tokenizer, "short", seqlen=64, progress=False)


def test_single_tokenization_single_bos(tiny, byte_tokenizer):
    counting = CountingTokenizer(byte_tokenizer)
    token_perplexity(tiny, counting, TEXT, seqlen=64, batch_size=4, limit=5, progress=False)
    assert counting.calls == 1
    ids = tokenize_text(byte_tokenizer, TEXT)
    assert ids[0].item() == BOS_ID and int((ids == BOS_ID).sum()) == 1


def test_training_mode_restored(tiny, byte_tokenizer):
    tiny.train()
    token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=64, limit=1, progress=False)
    assert tiny.training
    tiny.eval()
    token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=64, limit=1, progress=False)
    assert not tiny.training


class ScaledLM(torch.nn.Module):
    """A causal LM whose logits are NOT ``head(decoder(x))``: ``forward`` scales them (as Cohere's logit_scale)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def get_decoder(self):
        return self.inner.get_decoder()

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, **kwargs):
        logits = self.inner(input_ids=input_ids, **kwargs).logits
        return SimpleNamespace(logits=20.0 * logits)


def test_split_head_path_equals_full_logits(tiny, byte_tokenizer):
    from prunedlora.eval import perplexity

    windows = make_windows(tokenize_text(byte_tokenizer, TEXT), 100, 6)
    with torch.inference_mode():
        split = perplexity.nll_sum_split(tiny.get_decoder(), tiny.get_output_embeddings(), windows)
        full = perplexity.nll_sum_full_logits(tiny, windows)
    assert split == pytest.approx(full, rel=1e-6)


def test_chunked_reduction_equals_one_shot(tiny, byte_tokenizer, monkeypatch):
    from prunedlora.eval import perplexity

    ref = token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=100, limit=4, progress=False)["nll"]
    monkeypatch.setattr(perplexity, "CHUNK_ELEMENTS", 259 * 7)  # 7 tokens per chunk, ragged last chunk
    chunked = token_perplexity(tiny, byte_tokenizer, TEXT, seqlen=100, limit=4, progress=False)["nll"]
    assert chunked == pytest.approx(ref, rel=1e-6)


def test_model_whose_logits_are_not_head_of_decoder_falls_back(tiny, byte_tokenizer, caplog):
    scaled = ScaledLM(tiny)
    ids = tokenize_text(byte_tokenizer, TEXT)
    with caplog.at_level(logging.WARNING, logger="prunedlora.eval.perplexity"):
        out = token_perplexity(scaled, byte_tokenizer, TEXT, seqlen=64, limit=3, progress=False)
    assert out["nll"] == pytest.approx(_reference_nll(scaled, ids, 64, 3), rel=1e-5)
    assert "not head(decoder(x))" in caplog.text


# -------------------------------------------------------------------------------------------- runner
def _check_results_dir(out_dir: Path, tasks):
    doc = json.loads((out_dir / "eval" / "results.json").read_text())
    assert doc["model_id"] == "tiny" and doc["timestamp"] and doc["model"]["name_or_path"] == "tiny"
    assert set(doc["results"]) == set(tasks) == set(doc["settings"])
    for task in tasks:
        assert all(type(v) is float for v in doc["results"][task].values())
        s = doc["settings"][task]
        assert {"n", "n_shot", "seqlen", "limit", "split"} <= set(s) and type(s["n"]) is int
    md = (out_dir / "eval" / "results.md").read_text()
    assert "| task | metric | value | stderr | n | shots |" in md
    return doc


def test_runner_writes_files_and_keeps_earlier_ones(tiny, byte_tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_load_lm_text", lambda ds, split, data, path=None: TEXT)
    cfg = EvalConfig(limit=2, seqlen=64, batch_size=2)
    res = runner.evaluate(tiny, byte_tokenizer, ["wikitext2", "ptb"], cfg, DataConfig(), tmp_path, model_id="tiny",
                          identity={"adapter": None, "method": "lora"}, progress=False)
    assert set(res) == {"wikitext2", "ptb"} and set(res["wikitext2"]) == {"ppl", "nll"}
    doc = _check_results_dir(tmp_path, ["wikitext2", "ptb"])
    assert doc["settings"]["wikitext2"]["n"] == 2 and doc["settings"]["ptb"]["seqlen"] == 64
    assert doc["model"] == {"name_or_path": "tiny", "adapter": None, "method": "lora"}
    assert "| wikitext2 | ppl |" in capsys.readouterr().out
    # a second evaluation keeps the first results (and task folder) instead of overwriting them
    runner.evaluate(tiny, byte_tokenizer, ["ptb"], cfg, DataConfig(), tmp_path, model_id="tiny", progress=False)
    assert len(list((tmp_path / "eval").glob("results.prev-*.json"))) == 1
    assert len(list((tmp_path / "eval").glob("results.prev-*.md"))) == 1
    assert len(list((tmp_path / "eval").glob("tasks.prev-*"))) == 1


def test_runner_unknown_tasks(tiny, byte_tokenizer, tmp_path):
    cfg = EvalConfig()
    with pytest.raises(ConfigError, match=r"unknown task 'nope'.*gsm8k.*humaneval.*mmlu.*ptb.*wikitext2"):
        runner.evaluate(tiny, byte_tokenizer, ["wikitext2", "nope"], cfg, DataConfig(), tmp_path, model_id="tiny")
    assert runner.evaluate(tiny, byte_tokenizer, [], cfg, DataConfig(), tmp_path, model_id="tiny") == {}
    assert not (tmp_path / "eval").exists()  # nothing ran, nothing written


def test_format_results_table():
    doc = {"results": {"ptb": {"ppl": 12.3456789}, "gsm8k": {"exact_match_strict": 0.25}},
           "stderr": {"gsm8k": {"exact_match_strict": 0.125}},
           "settings": {"ptb": {"n": 3, "n_shot": 0}, "gsm8k": {"n": 8, "n_shot": 5}},
           "skipped": {"humaneval": "skipped: needs eval.allow_code_execution=true"}}
    lines = runner.format_results_table(doc).splitlines()
    assert lines[2] == "| ptb | ppl | 12.3457 |  | 3 | 0 |"
    assert lines[3] == "| gsm8k | exact_match_strict | 0.2500 | 0.1250 | 8 | 5 |"
    assert lines[4].startswith("| humaneval | – | skipped |")
    assert "| gsm8k | exact_match_strict | 0.5000 |  |  |  |" in runner.format_results_table(
        {"gsm8k": {"exact_match_strict": 0.5}}
    )


def test_limited_run_tokenizes_a_prefix_with_the_same_windows(byte_tokenizer, monkeypatch):
    from prunedlora.eval import perplexity

    text = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(3000))
    full = make_windows(tokenize_text(byte_tokenizer, text), 100, 5)
    counting = CountingTokenizer(byte_tokenizer)
    ids = perplexity.tokenize_for_windows(counting, text, 5 * 100)
    assert counting.calls == 1 and ids.numel() < len(text) // 10  # a prefix, tokenized in one call
    assert torch.equal(make_windows(ids, 100, 5), full)
    assert perplexity.tokenize_for_windows(byte_tokenizer, text[:300], 5 * 100).numel() == 301  # short text: all of it


# ----------------------------------------------------------------------------------- prunedlora-eval
def _compose(overrides):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from prunedlora.compose import register_configs

    register_configs()
    with initialize_config_module(version_base="1.3", config_module="prunedlora.configs"):
        return OmegaConf.to_object(compose("config", overrides=overrides))


def _fake_run_dir(run_dir: Path, byte_tokenizer) -> None:
    """A finished lora run on the tiny model: adapter/ (PEFT), merged model/, .hydra/config.yaml, summary."""
    from omegaconf import OmegaConf

    from prunedlora.adapters.lora import inject_lora
    from prunedlora.methods.lora.method import export_lora

    model = build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer))
    inject_lora(model, ["q_proj", "v_proj"], rank=4, alpha=8.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter: B is zero only at initialisation
                p.normal_(0.0, 0.2)
    export_lora(model, byte_tokenizer, run_dir, "tiny")
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": {"name": "tiny", "name_or_path": "tiny"}}),
                   run_dir / ".hydra" / "config.yaml")
    (run_dir / "summary.json").write_text(json.dumps({"method": "lora", "eval": {"ptb": {"ppl": 1.0}}}))


def test_budget_line_says_what_was_evaluated_and_which_key_lifts_the_limit():
    cfg = EvalConfig(limit=50)
    assert runner.budget_line("gsm8k", cfg, {"n": 50, "n_available": 1319}) == \
        "gsm8k: 50 of 1319 questions (eval.limit=50; set eval.limit=null for all)"
    assert runner.budget_line("humaneval", cfg, {"n": 164, "n_available": 164}) == "humaneval: all 164 problems"
    own = EvalConfig(limit=50, task_limits={"mmlu": 57})
    assert runner.budget_line("mmlu", own, {"n": 57, "n_available": 14042}) == (
        "mmlu: 57 of 14042 questions (eval.task_limits.mmlu=57; set eval.task_limits.mmlu=null and eval.limit=null "
        "for all)")
    assert runner.budget_line("wikitext2", cfg, {"n": 50, "seqlen": 512}) == (
        "wikitext2: the first 50 windows of 512 tokens of the test split (eval.limit=50; set eval.limit=null for "
        "the whole split)")
    assert runner.budget_line("ptb", EvalConfig(limit=None), {"n": 40, "seqlen": 2048}) == \
        "ptb: all 40 windows of 2048 tokens of the test split"


def test_standalone_eval_reuses_the_runs_eval_settings_except_overridden_keys():
    from prunedlora.eval.standalone import run_eval_config

    run = {"eval": {"limit": 8, "seqlen": 128, "task_limits": {"gsm8k": 4}, "max_gen_toks": 32,
                    "no_longer_a_key": 1}}  # a key an older version wrote is ignored
    current = EvalConfig(limit=50, seqlen=2048, batch_size=2)
    merged = run_eval_config(run, current, overridden=["eval.seqlen"])
    assert (merged.limit, merged.seqlen, merged.max_gen_toks, merged.batch_size) == (8, 2048, 32, 2)
    assert merged.task_limits["gsm8k"] == 4 and merged.task_limits["mmlu"] is None
    assert run_eval_config(run, current, ["eval.task_limits.gsm8k"]).task_limits["gsm8k"] is None
    assert run_eval_config(run, current, ["eval"]) is current  # eval=default on the command line: ours whole
    assert run_eval_config({"model": {}}, current, []) is current  # a run without an eval section


def test_prunedlora_eval_run_dir_merged_and_adapter_agree(tmp_path, data_root, byte_tokenizer):
    from prunedlora.eval.standalone import run_eval

    run_dir = tmp_path / "run"
    _fake_run_dir(run_dir, byte_tokenizer)
    out = {}
    for weights in ("merged", "adapter"):
        cfg = _compose([f"run_dir={run_dir}", "eval.limit=2", "eval.seqlen=64", f"eval.weights={weights}",
                        "logging.progress=false", f"data.root={data_root}", "data.hub=false"])
        out[weights] = run_eval(cfg, tmp_path / weights)
        doc = json.loads((tmp_path / weights / "eval" / "results.json").read_text())
        assert set(doc["results"]) == {"ptb"}  # the tasks of the run's summary.json
        assert doc["model"]["method"] == "lora" and doc["model"]["weights"] == weights
    assert doc["model"]["adapter"] == str((run_dir / "adapter").resolve())
    assert out["adapter"]["ptb"]["ppl"] == pytest.approx(out["merged"]["ptb"]["ppl"], rel=1e-4)
    base = _compose(["model=tiny", "eval.tasks=[ptb]", "eval.limit=2", "eval.seqlen=64", "logging.progress=false",
                     f"data.root={data_root}", "data.hub=false"])
    plain = run_eval(base, tmp_path / "base")["ptb"]["ppl"]
    assert plain != pytest.approx(out["merged"]["ptb"]["ppl"], rel=1e-4)  # the adapter does change the model


def test_prunedlora_eval_model_dir_with_embedded_adapter(tmp_path, data_root, byte_tokenizer):
    """A salr-style model/: base weights and a PEFT adapter in one folder evaluate as base + adapter."""
    from peft import LoraConfig, get_peft_model

    from prunedlora.eval.perplexity import token_perplexity as ppl
    from prunedlora.eval.standalone import run_eval

    model_dir = tmp_path / "model"
    base = build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer))
    base.save_pretrained(model_dir)
    byte_tokenizer.save_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(model_dir)
    cfg = _compose(["model=hf", f"model.name_or_path={model_dir}", "eval.tasks=[ptb]", "eval.limit=2",
                    "eval.seqlen=64", "logging.progress=false", f"data.root={data_root}", "data.hub=false"])
    got = run_eval(cfg, tmp_path / "out")["ptb"]["ppl"]
    from prunedlora.data.datasets import load_lm_text

    text = load_lm_text("ptb", "test", cfg.data)
    want = ppl(peft_model, byte_tokenizer, text, seqlen=64, limit=2, progress=False)["ppl"]
    assert got == pytest.approx(want, rel=1e-4)
    doc = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert doc["model"]["adapter"] == str(model_dir.resolve())


def _fake_salr_run(run_dir: Path, byte_tokenizer, formats: tuple[str, ...]) -> torch.nn.Module:
    """A finished salr run on the tiny model with the folders of ``formats``; returns the trained model."""
    from prunedlora.config import SparsityConfig
    from prunedlora.methods.salr.config import SalrConfig
    from prunedlora.methods.salr.method import SalrMethod

    torch.manual_seed(0)  # every call builds the same trained model
    model = build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer))
    method = SalrMethod(SalrConfig(residual_rank=4, rank=4, base_criterion="magnitude"), SparsityConfig(final=0.5))
    method.attach(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained-looking task adapter
                p.normal_(0.0, 0.2)
    figures = method.export(model, byte_tokenizer, run_dir, "tiny", formats)
    (run_dir / "summary.json").write_text(json.dumps({"method": "salr", "exports": figures["exports"]}))
    return model.eval()


def test_prunedlora_eval_salr_run_evaluates_the_compressed_form_by_default_and_the_served_one_on_request(
        tmp_path, data_root, byte_tokenizer):
    """eval.salr_form: auto is compressed/ where the run has it, else model/ + adapter/ (served); both forms and
    every base_format evaluate the trained model, and results.json says which form ran."""
    from prunedlora.data.datasets import load_lm_text
    from prunedlora.eval.standalone import run_eval

    got, model = {}, None
    every = ("hf", "adapter", "bitmap")
    cases = [(every, [], "compressed"), (every, ["eval.salr_form=served"], "served"),
             (every, ["eval.base_format=fused"], "compressed"), (("bitmap",), [], "compressed"),
             (("hf", "adapter"), [], "served")]
    for i, (formats, extra, form) in enumerate(cases):
        run_dir = tmp_path / "-".join(formats)
        if not run_dir.is_dir():
            model = _fake_salr_run(run_dir, byte_tokenizer, formats)
        cfg = _compose([f"run_dir={run_dir}", "eval.tasks=[ptb]", "eval.limit=2", "eval.seqlen=64",
                        "logging.progress=false", f"data.root={data_root}", "data.hub=false", *extra])
        got[i] = run_eval(cfg, tmp_path / "out" / str(i))["ptb"]["ppl"]
        identity = json.loads((tmp_path / "out" / str(i) / "eval" / "results.json").read_text())["model"]
        assert identity["salr_form"] == form
        folder = run_dir / ("compressed" if form == "compressed" else "adapter")
        assert identity["adapter"] == str(folder.resolve())
        if extra == ["eval.base_format=fused"]:
            assert identity["base_format"] == "fused" and identity["base_formats"] == {"fused": 14}
        elif form == "compressed":
            assert identity["base_format"] == "auto" and sum(identity["base_formats"].values()) == 14
    want = token_perplexity(model, byte_tokenizer, load_lm_text("ptb", "test", cfg.data), seqlen=64, limit=2,
                            progress=False)["ppl"]
    assert all(ppl == pytest.approx(want, rel=1e-4) for ppl in got.values()), (got, want)
    for formats, extra, fragment in ((("hf",), [], "export.formats=null"),
                                     (("bitmap",), ["eval.salr_form=served"], "use eval.salr_form=compressed"),
                                     (("hf", "adapter"), ["eval.salr_form=compressed"], "use eval.salr_form=served"),
                                     (("bitmap",), ["eval.weights=adapter"], "eval.salr_form=served")):
        run_dir = tmp_path / f"only-{'-'.join(formats)}"
        if not run_dir.is_dir():
            _fake_salr_run(run_dir, byte_tokenizer, formats)
        with pytest.raises(ConfigError, match=fragment):
            run_eval(_compose([f"run_dir={run_dir}", "eval.tasks=[ptb]", *extra]), tmp_path / "x")
    with pytest.raises(ConfigError, match="eval.base_format=sparse is not one of auto, fused"):
        run_eval(_compose([f"run_dir={run_dir}", "eval.tasks=[ptb]", "eval.base_format=sparse"]), tmp_path / "x")


def test_prunedlora_eval_custom_code_needs_trust(tmp_path, byte_tokenizer):
    from prunedlora.eval.standalone import run_eval

    model_dir = tmp_path / "pruned"
    build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer)).save_pretrained(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    cfg = _compose(["model=hf", f"model.name_or_path={model_dir}", "eval.tasks=[ptb]"])
    with pytest.raises(ConfigError, match="model.trust_remote_code=true"):
        run_eval(cfg, tmp_path / "out")
    cfg = _compose([f"run_dir={tmp_path}", "eval.tasks=[ptb]", "eval.weights=adapter"])
    with pytest.raises(ConfigError, match="no adapter/adapter_config.json"):
        run_eval(cfg, tmp_path / "out")


# -------------------------------------------------------------------------------------------- wandb
class FakeWandb:
    """Records what ``log_eval_run`` sends (the real client starts a service process: seconds)."""

    def __init__(self):
        self.calls, self.runs = [], []

    def init(self, **kwargs):
        run = SimpleNamespace(logged=[], summary={}, finished=False, kwargs=kwargs)
        run.log = lambda data, **kw: run.logged.append(data)
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run

    def Table(self, columns, data):  # noqa: N802 - wandb's name
        return SimpleNamespace(columns=columns, data=data)


def _eval_tiny(tiny, byte_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "_load_lm_text", lambda ds, split, data, path=None: TEXT)
    return runner.evaluate(tiny, byte_tokenizer, ["ptb"], EvalConfig(limit=1, seqlen=64), DataConfig(), tmp_path,
                           model_id="tiny", progress=False)


def test_standalone_eval_logs_metrics_and_table_to_wandb(tmp_path, monkeypatch, tiny, byte_tokenizer):
    import sys

    from prunedlora.config import LoggingConfig
    from prunedlora.eval.wandb_log import log_eval_run

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    results = _eval_tiny(tiny, byte_tokenizer, tmp_path, monkeypatch)
    log_eval_run(LoggingConfig(wandb=False), tmp_path, results, name="off")
    assert fake.runs == []  # off unless logging.wandb=true
    log_eval_run(LoggingConfig(wandb=True, project="p", mode="offline"), tmp_path, results, name="eval-tiny",
                 config={"model": {"name_or_path": "tiny"}})
    (run,) = fake.runs
    assert run.finished and run.kwargs["reinit"] == "finish_previous" and run.kwargs["mode"] == "offline"
    assert run.kwargs["dir"] == str(tmp_path) and run.kwargs["job_type"] == "eval"
    assert run.logged[0] == {"eval/ptb/ppl": results["ptb"]["ppl"], "eval/ptb/nll": results["ptb"]["nll"]}
    table = run.logged[1]["eval/results"]
    assert table.columns == ["task", "metric", "value", "stderr", "n", "shots"]
    assert table.data[0] == ["ptb", "ppl", results["ptb"]["ppl"], None, 1, 0]
    assert "| ptb | ppl |" in run.summary["eval/results_md"]


@pytest.mark.slow
def test_standalone_eval_logs_to_wandb_offline(tmp_path, monkeypatch, tiny, byte_tokenizer):
    """The real client in offline mode: a run file appears, no network, the run is finished."""
    import wandb

    from prunedlora.config import LoggingConfig
    from prunedlora.eval.wandb_log import log_eval_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    results = _eval_tiny(tiny, byte_tokenizer, tmp_path, monkeypatch)
    log_eval_run(LoggingConfig(wandb=True, project="prunedlora-test"), tmp_path, results, name="eval-tiny")
    assert wandb.run is None  # finished
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
