"""lm-eval tasks: generated YAMLs, the same task for every data source, scoring, and end-to-end runs.

Fast tests use the tiny random model (or a scripted fake ``LM``) on a few items of the real mirror; the
``slow`` one runs SmolLM2-135M on GSM8K and MMLU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from prunedlora.config import DataConfig, EvalConfig
from prunedlora.data import sources
from prunedlora.data.datasets import load_records
from prunedlora.eval import harness, lm_tasks, runner


@pytest.fixture
def mirror(data_root: Path) -> DataConfig:
    return DataConfig(root=str(data_root), hub=False)


def _fake_lm(answer_for):
    """An lm-eval ``LM`` that answers from the document: ``answer_for(doc)`` for generation, and the gold
    letter (or a fixed wrong one, as ``answer_for`` says) for multiple choice."""
    from lm_eval.api.model import LM

    class Scripted(LM):
        def generate_until(self, requests, disable_tqdm: bool = False):
            return [answer_for(r.doc) for r in requests]

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # a multiple-choice request's continuation is " A".." D"; the chosen letter gets the best score
            return [(0.0 if r.args[1].strip() == answer_for(r.doc) else -5.0, False) for r in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return [float(answer_for(r.doc)) for r in requests]

    return Scripted()


# ------------------------------------------------------------------------------------------ task files
@pytest.mark.parametrize("sizes, limit, expected", [
    ({"a": 3, "b": 3, "c": 3, "d": 3}, None, {"a": 3, "b": 3, "c": 3, "d": 3}),
    ({"a": 3, "b": 3, "c": 3, "d": 3}, 2, {"a": 1, "c": 1}),  # evenly spaced subjects
    ({"a": 3, "b": 3, "c": 3, "d": 3}, 6, {"a": 2, "b": 1, "c": 2, "d": 1}),
    ({"a": 1, "b": 5}, 4, {"a": 1, "b": 3}),  # a full subject leaves the rest to the others
    ({"a": 1, "b": 5}, 100, {"a": 1, "b": 5}),
])
def test_spread_limit(sizes, limit, expected):
    quotas = lm_tasks.spread_limit(sizes, limit)
    assert quotas == expected
    assert sum(quotas.values()) == min(limit or 10**9, sum(sizes.values()))


def test_mmlu_limit_spreads_over_subjects_and_keeps_none(tmp_path, mirror):
    spec = lm_tasks.mmlu_tasks(tmp_path, mirror, limit=57 * 2 + 3, num_fewshot=5)
    per_subject = spec.settings["items_per_subject"]
    assert spec.n_items == 117 and len(per_subject) == 57 and set(per_subject.values()) == {2, 3}
    group = yaml.safe_load((tmp_path / "mmlu.yaml").read_text())
    assert group["group"] == lm_tasks.MMLU_GROUP and len(group["task"]) == 57
    assert group["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": True}]
    sub = yaml.safe_load((tmp_path / "mmlu" / "abstract_algebra.yaml").read_text())
    files = sub["dataset_kwargs"]["data_files"]
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in files.values())
    assert sub["fewshot_config"] == {"sampler": "first_n"} and sub["num_fewshot"] == 5
    assert sub["description"].startswith("The following are multiple choice questions (with answers) about abstract")
    # The mirror's literal "None" choices (pandas would read them as missing) survive as strings.
    spec = lm_tasks.mmlu_tasks(tmp_path / "all", mirror, limit=None, num_fewshot=0)
    assert spec.n_items == 14042 and spec.settings["fewshot_split"] is None
    choices = [c for f in (tmp_path / "all" / "data" / "mmlu").glob("*_test.jsonl")
               for line in f.read_text().splitlines() for c in json.loads(line)["choices"]]
    assert choices.count("None") == 10 and None not in choices


def test_generated_yaml_loads_in_lm_eval_with_real_newlines(tmp_path, mirror):
    from lm_eval.tasks import TaskManager

    lm_tasks.gsm8k_task(tmp_path, mirror, limit=3, num_fewshot=2, max_gen_toks=16)
    lm_tasks.humaneval_task(tmp_path, mirror, limit=2, max_gen_toks=16, timeout_s=5.0)
    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False).load_task_or_group(
        [lm_tasks.GSM8K_TASK, lm_tasks.HUMANEVAL_TASK])
    he = tasks[lm_tasks.HUMANEVAL_TASK].config
    assert he.generation_kwargs["until"] == ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
    assert he.unsafe_code is True and he.generation_kwargs["max_gen_toks"] == 16
    g = tasks[lm_tasks.GSM8K_TASK]
    assert g.config.num_fewshot == 2 and g.config.generation_kwargs["until"] == ["Question:", "</s>", "<|im_end|>"]
    assert len(g.eval_docs) == 3 and g.doc_to_text(g.eval_docs[0]).endswith("\nAnswer:")


def test_hub_and_mirror_give_the_same_task(tmp_path, data_root, monkeypatch):
    """Online and offline differ only in where records come from: same data files, same YAML but paths."""
    mirror = DataConfig(root=str(data_root), hub=False)

    def hub_rows(hub):  # the hub's row shapes, built from the mirror's records
        dataset = {"openai/gsm8k": "gsm8k", "cais/mmlu": "mmlu", "openai/openai_humaneval": "humaneval"}[hub.path]
        return load_records(dataset, hub.split, mirror)

    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    monkeypatch.setattr(sources, "_load_from_hub", hub_rows)
    online = DataConfig(root=None, hub=True)
    for name, data in (("mirror", mirror), ("hub", online)):
        lm_tasks.gsm8k_task(tmp_path / name, data, limit=5, num_fewshot=5, max_gen_toks=32)
        lm_tasks.mmlu_tasks(tmp_path / name, data, limit=10, num_fewshot=5)
        lm_tasks.humaneval_task(tmp_path / name, data, limit=3, max_gen_toks=32, timeout_s=5.0)
    files = sorted(p.relative_to(tmp_path / "mirror") for p in (tmp_path / "mirror").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "hub") for p in (tmp_path / "hub").rglob("*") if p.is_file())
    assert len(files) > 20
    for rel in files:
        a, b = (tmp_path / "mirror" / rel).read_text(), (tmp_path / "hub" / rel).read_text()
        assert a.replace(str(tmp_path / "mirror"), "X") == b.replace(str(tmp_path / "hub"), "X"), rel


# ------------------------------------------------------------------------------------------- scoring
@pytest.mark.parametrize("reply, strict, flexible", [
    (lambda doc: " " + doc["answer"], 1.0, 1.0),  # the gold text itself, "#### N" included
    (lambda doc: " The answer is " + doc["answer"].split("#### ")[-1] + ".", 0.0, 1.0),  # no "####"
    (lambda doc: " #### 1,000,000,007", 0.0, 0.0),
])
def test_gsm8k_strict_and_flexible_exact_match(tmp_path, mirror, reply, strict, flexible):
    spec = lm_tasks.gsm8k_task(tmp_path, mirror, limit=4, num_fewshot=0, max_gen_toks=32)
    res = harness.simple_evaluate_local(_fake_lm(reply), tmp_path, spec.lm_eval_tasks)
    assert harness.metric_value(res, lm_tasks.GSM8K_TASK, "exact_match", "strict-match")[0] == strict
    assert harness.metric_value(res, lm_tasks.GSM8K_TASK, "exact_match", "flexible-extract")[0] == flexible
    assert harness.n_samples(res, lm_tasks.GSM8K_TASK) == 4


def test_mmlu_weighted_and_macro_accuracy(tmp_path, mirror, byte_tokenizer, tiny, monkeypatch):
    """Right only on abstract_algebra (3 of 5 questions): weighted 3/5, macro (1 + 0) / 2."""
    def answer(doc):
        right = "ABCD"[doc["answer"]]
        return right if doc["subject"] == "abstract_algebra" else "ABCD"[(doc["answer"] + 1) % 4]

    monkeypatch.setattr(lm_tasks, "spread_limit", lambda sizes, limit: {"abstract_algebra": 3, "virology": 2})
    monkeypatch.setattr(runner.harness, "run_lm_eval", lambda model, tokenizer, tasks_dir, names, **kw:
                        harness.simple_evaluate_local(_fake_lm(answer), tasks_dir, names))
    res = runner.eval_mmlu(tiny, byte_tokenizer, EvalConfig(limit=5, num_fewshot=1), mirror, work_dir=tmp_path)
    assert res.metrics["acc"] == pytest.approx(3 / 5) and res.metrics["acc_macro"] == pytest.approx(0.5)
    assert res.settings["n"] == 5 and res.settings["n_shot"] == 1
    assert res.details["subjects"]["virology"] == {"acc": 0.0, "n": 2, "acc_stderr": 0.0}
    assert set(res.stderr) == {"acc", "acc_macro"}


def test_wikitext_articles_and_lm_eval_word_perplexity(tmp_path, mirror):
    records = load_records("wikitext2", "test", mirror)
    docs = lm_tasks.wikitext_documents(records)
    assert len(docs) == 62 and docs[1]["page"].startswith(" = Du Fu = \n")
    raw = (Path(mirror.root) / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    assert "".join(d["page"] for d in docs) == raw  # every line kept, in its raw form
    spec = lm_tasks.wikitext_task(tmp_path, mirror, limit=2)
    res = harness.simple_evaluate_local(_fake_lm(lambda doc: -len(doc["page"].split())), tmp_path,
                                        spec.lm_eval_tasks)  # log-likelihood -1 per word
    assert harness.metric_value(res, lm_tasks.WIKITEXT_TASK, "word_perplexity")[0] == pytest.approx(math.e, rel=0.01)
    assert harness.n_samples(res, lm_tasks.WIKITEXT_TASK) == 2


# ---------------------------------------------------------------------------------------- end to end
def test_all_five_tasks_on_tiny_from_the_mirror(tiny, byte_tokenizer, tmp_path, mirror, capsys):
    cfg = EvalConfig(limit=2, seqlen=128, batch_size=2, num_fewshot=1, max_gen_toks=4, allow_code_execution=True,
                     humaneval_timeout_s=20.0)
    tasks = ["gsm8k", "mmlu", "humaneval", "wikitext2", "ptb"]
    res = runner.evaluate(tiny, byte_tokenizer, tasks, cfg, mirror, tmp_path, model_id="tiny", progress=False)
    assert set(res["gsm8k"]) == {"exact_match_strict", "exact_match_flexible"}
    assert set(res["mmlu"]) == {"acc", "acc_macro"} and set(res["humaneval"]) == {"pass@1"}
    for task in ("gsm8k", "mmlu", "humaneval"):
        assert all(0.0 <= v <= 1.0 for v in res[task].values()), res[task]
    for task in ("wikitext2", "ptb"):
        assert set(res[task]) == {"ppl", "nll"} and 1.0 < res[task]["ppl"] < 1e4
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert doc["results"] == res and not doc["skipped"] and doc["versions"]["lm_eval"]
    for task in tasks:
        s = doc["settings"][task]
        assert s["n"] == 2 and s["limit"] == 2 and all(type(v) is float for v in res[task].values())
    assert doc["settings"]["gsm8k"]["n_shot"] == 1 and doc["settings"]["humaneval"]["n_shot"] == 0
    assert doc["settings"]["mmlu"]["subjects"] == 2 and doc["settings"]["ptb"]["seqlen"] == 128
    assert doc["settings"]["gsm8k"]["sources"]["test"].startswith("mirror:")
    assert "gsm8k" in doc["stderr"] and (tmp_path / "eval" / "tasks" / "gsm8k.yaml").is_file()
    assert not (tmp_path / "eval" / "tasks" / lm_tasks.DATASETS_CACHE).exists()  # load_dataset's cache is removed
    assert "| humaneval | pass@1 |" in capsys.readouterr().out


def test_humaneval_without_opt_in_is_skipped_and_runs_nothing(tiny, byte_tokenizer, tmp_path, mirror, monkeypatch,
                                                              capsys):
    import subprocess

    def no_process(*args, **kwargs):
        raise AssertionError("a subprocess was started without eval.allow_code_execution")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    monkeypatch.setattr(harness, "run_lm_eval", no_process)
    res = runner.evaluate(tiny, byte_tokenizer, ["humaneval"], EvalConfig(limit=2), mirror, tmp_path, model_id="tiny",
                          progress=False)
    assert res == {}
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "eval.allow_code_execution=true" in doc["skipped"]["humaneval"]
    out = capsys.readouterr().out
    assert "humaneval skipped" in out and "| humaneval | – | skipped |" in out
    assert not list((tmp_path / "eval" / "tasks").glob("humaneval*"))


@pytest.mark.slow
def test_smollm2_gsm8k_and_mmlu_through_lm_eval(tmp_path, mirror):
    """Real weights: a few GSM8K questions (5-shot, generation) and MMLU questions (5-shot) via HFLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunedlora.models.smollm2 import smollm2_offline_dir

    path = smollm2_offline_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = EvalConfig(limit=3, batch_size=3, max_gen_toks=48)
    res = runner.evaluate(model, tokenizer, ["gsm8k", "mmlu"], cfg, mirror, tmp_path, model_id=str(path),
                          progress=False)
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert doc["settings"]["gsm8k"]["n"] == 3 and doc["settings"]["gsm8k"]["n_shot"] == 5
    assert doc["settings"]["mmlu"]["n"] == 3 and doc["settings"]["mmlu"]["n_shot"] == 5
    assert all(0.0 <= v <= 1.0 for t in ("gsm8k", "mmlu") for v in res[t].values())
    assert all(math.isfinite(v) for v in doc["stderr"]["gsm8k"].values())
