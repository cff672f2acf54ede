"""Known-harmless third-party messages, silenced where they are emitted (``logging.verbose=true`` keeps them).

A clean run should print only what a user can act on. Each message dropped here is named exactly, on the
logger or call that emits it, never by a filter on the root logger or on a whole library:

* lm-eval's ``HFLM`` warns that ``pretrained`` is not a string and that it was handed an initialised
  model: passing our in-memory model object is exactly how ``prunedlora.eval.harness`` calls it.
* lm-eval's "Left truncation applied" (one line per batch) is counted by ``harness`` and reported once.
* transformers' "Token indices sequence length is longer than ..." comes from the tokenizer lm-eval uses
  on those same over-long prompts; ``harness`` sets the tokenizer's own warned-once flag for the call.
* lm-eval records ``git describe`` in its results dict, and git prints "fatal: not a git repository" when
  the working directory is not a checkout: :func:`lm_eval_probes` runs the same probe with stderr captured.
  It also replaces lm-eval's environment report (torch's ``collect_env``: ``pip list`` and other
  subprocesses, seconds per task, in a results field nothing reads) by the two versions we do record.
* transformers' ``save_pretrained`` asks accelerate to unwrap the model, and accelerate imports DeepSpeed
  (seconds, and a "Setting accelerator to CPU" warning) merely to check whether the model is a DeepSpeed
  engine. :func:`deepspeed_left_unimported` answers that check while DeepSpeed is not imported: no object
  can be an instance of a class that was never loaded, so the answer is exact.

The patches replace public module-level functions of accelerate and lm-eval for the duration of one call
each and restore them after; ``tests/test_quiet.py`` fails when any of them disappears upstream.
"""

from __future__ import annotations

import contextlib
import logging
import subprocess
import sys
from collections.abc import Iterator

HARMLESS: dict[str, tuple[str, ...]] = {
    "lm_eval.models.huggingface": ("`pretrained` model kwarg is not of type `str`",
                                   "Passed an already-initialized model through `pretrained`"),
}
"""Logger name -> starts of the messages dropped from it."""

_state = {"verbose": False}


class DropMessages(logging.Filter):
    """Drops records whose message starts with one of ``prefixes``; everything else passes."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def install(verbose: bool) -> None:
    """Attach the :data:`HARMLESS` filters (``verbose=False``) or remove them (``True``); idempotent."""
    _state["verbose"] = verbose
    for name, prefixes in HARMLESS.items():
        logger = logging.getLogger(name)
        for old in [f for f in logger.filters if isinstance(f, DropMessages)]:
            logger.removeFilter(old)
        if not verbose:
            logger.addFilter(DropMessages(prefixes))
    # DeepSpeed's import-time info lines, when a run does use it (its own logger, by name).
    if not verbose:
        for name in ("bitsandbytes", "DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.ERROR)


def verbose() -> bool:
    """Whether the user asked for every third-party message (``logging.verbose=true`` or ``debug=true``)."""
    return _state["verbose"]


def _git_describe() -> str | None:
    """``git describe --always`` in the working directory, or None outside a checkout (nothing printed)."""
    try:
        out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _versions_only(storage: dict) -> None:
    """What prunedlora reads of lm-eval's environment report: the lm-eval and transformers versions."""
    from importlib.metadata import version

    storage.update({"lm_eval_version": version("lm_eval"), "transformers_version": version("transformers"),
                    "pretty_env_info": "not collected (prunedlora records versions in results.json)"})


@contextlib.contextmanager
def lm_eval_probes() -> Iterator[None]:
    """Within the block, ``simple_evaluate`` records git and versions without printing or spawning ``pip``."""
    if verbose():
        yield
        return
    import lm_eval.evaluator as evaluator

    originals = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash, evaluator.add_env_info = _git_describe, _versions_only
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = originals


@contextlib.contextmanager
def deepspeed_left_unimported() -> Iterator[None]:
    """Within the block, accelerate's "is this a DeepSpeed engine?" check does not import DeepSpeed."""
    if "deepspeed" in sys.modules:  # a DeepSpeed run: the real check is needed and costs nothing more
        yield
        return
    import accelerate.utils.other as other

    original = other.is_deepspeed_available
    other.is_deepspeed_available = lambda: "deepspeed" in sys.modules
    try:
        yield
    finally:
        other.is_deepspeed_available = original
