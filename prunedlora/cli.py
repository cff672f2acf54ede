"""Console entry points: ``prunedlora-train`` and ``prunedlora-eval``.

Each converts the composed Hydra config to typed dataclasses once and calls one function. Every error,
whether Hydra meets it while composing the overrides (``prunedlora.cli_errors``) or the run raises it
(``ConfigError``), prints as one paragraph, ``prunedlora: error: ...``, and exits 2 for bad input, 1 for a
failure of the run itself; ``debug=true`` is the one switch that shows tracebacks instead. A start that
fails after Hydra created its run directory leaves the error at the end of that directory's ``cli.log``.
Ctrl-C exits 130 (during training after saving a checkpoint, see ``prunedlora.train.preemption``).
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from prunedlora import quiet
from prunedlora.cli_errors import (
    EVAL_USAGE,
    debug_requested,
    explain,
    explain_omegaconf,
    format_error,
    override_keys,
    paragraph,
)
from prunedlora.compose import register_configs
from prunedlora.config import ConfigError, RootConfig
from prunedlora.validation import validate

log = logging.getLogger("prunedlora")

EXIT_CONFIG_ERROR = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C
HELP_FLAGS = ("--help", "-h")
# Flags that make Hydra print something instead of running a job: no model needs to be named for them.
PRINT_FLAGS = (*HELP_FLAGS, "--hydra-help", "--cfg", "-c", "--info", "-i", "--shell-completion", "-sc", "--resolve")
EVAL_RUN_DIR = "hydra.run.dir='${prunedlora_eval_dir:${run_dir},${model.name_or_path}}/${now:%Y-%m-%d_%H-%M-%S-%f}'"


def _log_to_run_files(message: str) -> None:
    """Append ``message`` to the job's log files (Hydra's ``cli.log``) only, not to the console again."""
    record = logging.LogRecord("prunedlora", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _fail(text: str, code: int) -> NoReturn:
    message = format_error(text)
    print(message, file=sys.stderr, flush=True)
    _log_to_run_files(message)
    sys.exit(code)


def _report_errors(fn: Callable[[RootConfig, Path], Any], cfg: DictConfig) -> Any:
    debug = bool(cfg.get("debug", False))
    quiet.install(verbose=debug or bool(OmegaConf.select(cfg, "logging.verbose", default=False)))
    try:
        root: RootConfig = OmegaConf.to_object(cfg)
        validate(root)  # before fn imports torch and loads anything: bad values fail in a second
        return fn(root, Path(HydraConfig.get().runtime.output_dir))
    except KeyboardInterrupt:
        if debug:
            raise
        message = "prunedlora: stopped by Ctrl-C without saving (checkpoints saved earlier are kept)."
        print(message, file=sys.stderr, flush=True)
        _log_to_run_files(message)
        sys.exit(EXIT_INTERRUPTED)
    except ConfigError as exc:
        if debug:
            raise
        _fail(str(exc), EXIT_CONFIG_ERROR)
    except OmegaConfBaseException as exc:  # a missing mandatory value (model=hf without name_or_path)
        if debug:
            raise
        _fail(explain_omegaconf(exc) or paragraph(str(exc)), EXIT_CONFIG_ERROR)
    except Exception as exc:  # anything else: one paragraph, the traceback with debug=true
        if debug:
            raise
        _fail(f"{type(exc).__name__}: {exc}", EXIT_FAILURE)


def _run(app: Callable[[], Any], prog: str) -> None:
    """Run a Hydra app with our help and with Hydra's own errors (bad overrides, run dir) in our words."""
    argv = sys.argv[1:]
    if any(arg in HELP_FLAGS for arg in argv):
        from prunedlora.cli_help import help_text

        print(help_text(prog))
        sys.exit(0)
    previous = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises instead of printing its own report
    try:
        app()
        # The work is done: exempt torch's and transformers' millions of objects from the interpreter's final
        # garbage collection, which otherwise costs seconds at exit (atexit handlers still run).
        gc.freeze()
    except Exception as exc:
        if debug_requested(argv):
            raise
        text = explain(exc, argv)
        _fail(text or f"{type(exc).__name__}: {exc}", EXIT_CONFIG_ERROR if text else EXIT_FAILURE)
    finally:
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def _recipe_run(cfg: RootConfig, run_dir: Path) -> dict[str, Any]:
    from prunedlora.train.recipe import run  # lazy: keeps `--help` and config errors fast

    return run(cfg, run_dir)


def _standalone_eval(cfg: RootConfig, out_dir: Path, eval_overrides: list[str]) -> dict[str, Any]:
    from prunedlora.eval.standalone import run_eval  # lazy, as above

    return run_eval(cfg, out_dir, eval_overrides)


@hydra.main(version_base="1.3", config_path="pkg://prunedlora.configs", config_name="config")
def _train(cfg: DictConfig) -> float | None:
    summary = _report_errors(_recipe_run, cfg)
    from prunedlora.train.engine import release_between_jobs

    release_between_jobs()  # the run's model and optimizer are gone now; return their GPU memory
    return summary.get("final_loss") if summary else None  # the value a sweeper optimises


@hydra.main(version_base="1.3", config_path="pkg://prunedlora.configs", config_name="config")
def _eval(cfg: DictConfig) -> None:
    overridden = [k for k in override_keys(HydraConfig.get().overrides.task) if k == "eval" or k.startswith("eval.")]
    _report_errors(partial(_standalone_eval, eval_overrides=overridden), cfg)


def eval_output_dir(run_dir: str | None, name_or_path: str | None) -> str:
    """Where a standalone evaluation is filed: under the run it evaluates, else under the model's name."""
    if run_dir:
        return str(Path(run_dir).expanduser() / "evals")
    path = Path(str(name_or_path or "model").rstrip("/"))
    name = f"{path.parent.name}-{path.name}" if path.name in ("model", "adapter") and path.parent.name else path.name
    return f"outputs/eval/{re.sub(r'[^A-Za-z0-9._-]+', '_', name) or 'model'}"


def train_main() -> None:
    """``prunedlora-train [overrides]``."""
    register_configs()
    _run(_train, "prunedlora-train")


def eval_main() -> None:
    """``prunedlora-eval run_dir=<dir> | model.name_or_path=<dir or hub id> [eval.tasks=[...]]``."""
    register_configs()
    argv = sys.argv[1:]
    keys = override_keys(argv)
    if not any(arg.split("=")[0] in PRINT_FLAGS for arg in argv):
        if not any(k in ("run_dir", "model", "experiment") or k.startswith("model.") for k in keys):
            print(f"prunedlora-eval: error: {EVAL_USAGE}", file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
    multirun = any(arg in ("-m", "--multirun") for arg in argv)
    for arg in argv:  # results are filed under the run: a mistyped run_dir must not create a directory
        key, _, value = arg.lstrip("+").partition("=")
        if key == "run_dir" and value and not multirun and not Path(value).expanduser().is_dir():
            print(format_error(f"run_dir={value} is not a directory. Give a prunedlora-train run directory (it "
                               "holds model/ and summary.json), or evaluate a model with "
                               "model.name_or_path=<hub id or local dir>."), file=sys.stderr)
            sys.exit(EXIT_CONFIG_ERROR)
    if not any(k.startswith("hydra.run.dir") for k in keys):
        OmegaConf.register_new_resolver("prunedlora_eval_dir", eval_output_dir, replace=True)
        sys.argv.append(EVAL_RUN_DIR)
    _run(_eval, "prunedlora-eval")
