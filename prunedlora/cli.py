"""Console entry points: ``prunedlora-train`` and ``prunedlora-eval``.

Each converts the composed Hydra config to typed dataclasses once and calls one function. User errors
(``ConfigError``) print as one paragraph with a non-zero exit; tracebacks only with ``debug=true``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from prunedlora.config import ConfigError, RootConfig, register_configs

log = logging.getLogger("prunedlora")

EXIT_CONFIG_ERROR = 2
EXIT_FAILURE = 1


def _quiet_third_party_logs() -> None:
    """Import-time chatter of optional backends (pulled in by peft) is noise in a CLI run."""
    for name in ("bitsandbytes", "DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _report_errors(fn: Callable[[RootConfig, Path], Any], cfg: DictConfig) -> Any:
    debug = bool(cfg.get("debug", False))
    _quiet_third_party_logs()
    try:
        root: RootConfig = OmegaConf.to_object(cfg)
        return fn(root, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as exc:
        if debug:
            raise
        print(f"prunedlora: error: {exc}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except Exception as exc:  # anything else: one line, the traceback with debug=true
        if debug:
            raise
        print(f"prunedlora: error: {type(exc).__name__}: {exc}\n(run again with debug=true for the traceback)",
              file=sys.stderr)
        sys.exit(EXIT_FAILURE)


@hydra.main(version_base="1.3", config_path="pkg://prunedlora.configs", config_name="config")
def _train(cfg: DictConfig) -> float | None:
    from prunedlora.train.engine import release_between_jobs
    from prunedlora.train.recipe import run  # lazy: keeps `--help` and config errors fast

    summary = _report_errors(run, cfg)
    release_between_jobs()  # the run's model and optimizer are gone now; return their GPU memory
    return summary.get("final_loss") if summary else None  # the value a sweeper optimises


@hydra.main(version_base="1.3", config_path="pkg://prunedlora.configs", config_name="config")
def _eval(cfg: DictConfig) -> None:
    from prunedlora.eval.standalone import run_eval

    _report_errors(run_eval, cfg)


def train_main() -> None:
    """``prunedlora-train [overrides]``."""
    register_configs()
    _train()


def eval_main() -> None:
    """``prunedlora-eval run_dir=<dir> | model.name_or_path=<dir or hub id> [eval.tasks=[...]]``."""
    register_configs()
    _eval()
