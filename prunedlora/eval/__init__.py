"""Evaluation: token-level perplexity, GSM8K exact match and the task registry (``runner.EVALUATORS``)."""

from .gsm8k import extract_flexible, extract_strict, gsm8k_exact_match, normalize_number
from .perplexity import token_perplexity
from .runner import EVALUATORS, TaskResult, evaluate, format_results_table

__all__ = [
    "EVALUATORS",
    "TaskResult",
    "evaluate",
    "extract_flexible",
    "extract_strict",
    "format_results_table",
    "gsm8k_exact_match",
    "normalize_number",
    "token_perplexity",
]
