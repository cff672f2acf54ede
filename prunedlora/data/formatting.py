"""Training (prompt, target) pairs, in the same prompt format the evaluation harness uses.

Training on the evaluation's own prompt format means the fine-tuned model is measured on the
distribution it learned: GSM8K follows lm-eval's ``gsm8k`` task (``"Question: ...\\nAnswer:"`` then
``" " + answer``), MMLU lm-eval's ``mmlu_<subject>`` task (the description line, the question, the
lettered choices, ``"Answer:"``, target ``" A"`` .. ``" D"``). The loss is later masked to the target.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prunedlora.data.sources import DataError

LETTERS = "ABCD"


def _qa(record: dict[str, Any]) -> tuple[str, str]:
    # lm-eval gsm8k: doc_to_text "Question: {{question}}\nAnswer:", target_delimiter " ".
    return f"Question: {record['question']}\nAnswer:", f" {record['answer']}"


def mmlu_description(subject: str) -> str:
    """lm-eval's per-subject MMLU description, e.g. ``about abstract algebra.\\n\\n``."""
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def _mmlu(record: dict[str, Any]) -> tuple[str, str]:
    # lm-eval mmlu: "{{question.strip()}}\nA. {{choices[0]}}\n...\nD. {{choices[3]}}\nAnswer:" and the
    # subject description once in front (as the zero-shot evaluation context has it).
    choices = "".join(f"\n{letter}. {choice}" for letter, choice in zip(LETTERS, record["choices"], strict=True))
    prompt = f"{record['question'].strip()}{choices}\nAnswer:"
    if record.get("subject"):
        prompt = mmlu_description(record["subject"]) + prompt
    return prompt, f" {LETTERS[record['answer']]}"


def _code(record: dict[str, Any]) -> tuple[str, str]:
    return record["prompt"], record["canonical_solution"]


def _instruction(record: dict[str, Any]) -> tuple[str, str]:
    # The Alpaca template without input, as LoRAPrune's training script builds its LaMini prompts.
    return ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            f"request.\n\n### Instruction:\n{record['instruction']}\n\n### Response:\n"), record["response"]


def _text(record: dict[str, Any]) -> tuple[str, str]:
    return "", record["text"]


PROMPT_TEMPLATES: dict[str, Callable[[dict[str, Any]], tuple[str, str]]] = {
    "gsm8k": _qa,
    "metamath_small": _qa,  # the rationale is the target, in GSM8K's format so evaluation agrees
    "metamathqa": _qa,
    "lamini": _instruction,
    "mmlu": _mmlu,
    "humaneval": _code,
    "wikitext2": _text,
    "ptb": _text,
}
"""Dataset id -> record formatter returning (prompt, target)."""


def format_example(dataset: str, record: dict) -> tuple[str, str]:
    """Turn one record into a (prompt, target) training pair.

    Args:
        dataset: Dataset id the record came from.
        record: A record as returned by :func:`prunedlora.data.load_records`.

    Returns:
        ``(prompt, target)``; the prompt is empty for plain-text corpora.

    Raises:
        DataError: No template for the dataset, or the record lacks a field the template needs.
    """
    if dataset not in PROMPT_TEMPLATES:
        raise DataError(
            f"No prompt template for dataset {dataset!r}; templates exist for {sorted(PROMPT_TEMPLATES)}. "
            "Fix task.dataset, or add a formatter to PROMPT_TEMPLATES in prunedlora/data/formatting.py."
        )
    try:
        return PROMPT_TEMPLATES[dataset](record)
    except (KeyError, IndexError, ValueError) as err:
        raise DataError(
            f"Record of dataset {dataset!r} does not fit its prompt template ({type(err).__name__}: {err}); "
            f"record keys: {sorted(record)}. Check that task.dataset matches the file given in task.path."
        ) from err
