"""Evaluation: lm-eval tasks (GSM8K, MMLU, HumanEval), token-level perplexity, the task registry and reports.

``runner.evaluate`` is the entry point used by ``prunedlora-train`` and ``prunedlora-eval``; lm-eval and
wandb are imported lazily inside the functions that need them.
"""

from .humaneval import pass_at_k_estimate, run_program
from .perplexity import token_perplexity
from .runner import EVALUATORS, TaskResult, evaluate, format_results_table

__all__ = [
    "EVALUATORS",
    "TaskResult",
    "evaluate",
    "format_results_table",
    "pass_at_k_estimate",
    "run_program",
    "token_perplexity",
]
