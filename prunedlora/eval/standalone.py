"""``prunedlora-eval``: evaluate a saved run or any Hugging Face causal LM on ``eval.tasks``.

What gets loaded:

* ``run_dir=<dir>`` (a ``prunedlora-train`` run directory), ``eval.weights=merged`` (default): the exported
  ``<dir>/model``. That covers the LoRA family (merged) and loraprune's physically pruned model, whose
  ``config.json`` names its own modelling code (``auto_map``), loaded with ``trust_remote_code=True`` because
  that code is prunedlora's own ``modeling_pruned_llama.py`` written by the run.
* salr runs (``summary.json``'s ``exports``: ``model/`` is the pruned base, served with ``adapter/``), by
  ``eval.salr_form``: ``compressed`` rebuilds ``compressed/`` with ``load_salr_export`` (the sparse base in bitmap
  form, run as ``eval.base_format``: auto keeps the fused bitmap kernel where it beats dense), ``served`` puts
  ``adapter/`` on ``model/`` through ``peft.PeftModel`` (what a server runs), ``auto`` (default) is compressed
  where the run has ``compressed/``. ``results.json``'s ``model`` records the form (``salr_form``, and for
  compressed ``base_format`` and ``base_formats``: how many linears run as each). ``eval.weights`` is refused
  there. Runs exported before the folders were split carry the adapter inside ``model/``, which transformers'
  PEFT integration attaches on load.
* ``run_dir=<dir> eval.weights=adapter``: the run's base model (its ``.hydra/config.yaml`` ``model``
  section) with ``<dir>/adapter`` on top through ``peft.PeftModel``, unmerged.
* ``model.name_or_path=<dir or hub id>``: any causal LM (a hub id resolves as for training, offline
  fallbacks included); a folder holding only a PEFT adapter (``adapter_config.json``, no ``config.json``)
  is loaded on its ``base_model_name_or_path`` through ``PeftModel``. Custom modelling code needs
  ``model.trust_remote_code=true``.

Results go to this command's own output directory (Hydra's run dir: ``<run dir>/evals/<time>`` for a run,
``outputs/eval/<model name>/<time>`` for a model), so an evaluation never overwrites what a training run
wrote. With ``run_dir=``, the run's own ``eval`` settings (its ``.hydra/config.yaml``: limit, task limits,
seqlen, shots, ...) apply, except the keys given on this command line. The defaults of ``eval.tasks`` come
from the command line, else the run's ``summary.json`` (the tasks it was evaluated on), else the run's
``eval.tasks`` and ``task.eval_tasks``, else this config's ``task.eval_tasks``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from prunedlora.config import ConfigError, EvalConfig, ModelConfig, RootConfig
from prunedlora.eval.runner import evaluate
from prunedlora.eval.wandb_log import log_eval_run
from prunedlora.export.bitmap import BITMAP_FILE
from prunedlora.export.compressed import base_formats, load_salr_export
from prunedlora.models.load import load_model, load_tokenizer, resolve_device
from prunedlora.validation import validate

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _exported_model_dir(run_dir: Path) -> Path:
    model_dir = run_dir / "model"
    if not (model_dir / "config.json").is_file():
        raise ConfigError(
            f"run_dir={run_dir} has no exported model ({model_dir}/config.json is missing). Point run_dir at a "
            "finished prunedlora-train run directory, or evaluate a model with model.name_or_path=<dir or hub id>."
        )
    return model_dir


def _has_custom_code(model_dir: Path) -> bool:
    return bool(_read_json(model_dir / "config.json").get("auto_map"))


def run_model_config(run_dir: Path, fallback: ModelConfig) -> ModelConfig:
    """The ``model`` section a run was trained with (its ``.hydra/config.yaml``), else ``fallback``."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.is_file():
        return fallback
    section = OmegaConf.load(path).get("model")
    if section is None:
        return fallback
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), section)
    return OmegaConf.to_object(merged)


def _peft_on(base, adapter_dir: Path):
    from peft import PeftModel  # lazy: ~4 s import

    return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)


def _serves_base_with_adapter(exports: dict[str, Any]) -> bool:
    """A run whose ``model/`` is a base that ``adapter/`` goes on (salr), by ``summary.json``'s ``exports``."""
    return ((exports.get("model") or {}).get("serve_with") == "adapter"
            or (exports.get("adapter") or {}).get("base") == "model" or "compressed" in exports)


def _salr_form(form: str, run_dir: Path) -> str:
    """``eval.salr_form`` resolved against the folders the run holds (auto: compressed/ where it exists).

    Raises:
        ConfigError: the form asked for (or any form) is missing from the run.
    """
    served = (run_dir / "model" / "config.json").is_file() and (run_dir / "adapter" / ADAPTER_CONFIG).is_file()
    held = {"compressed": (run_dir / "compressed" / BITMAP_FILE).is_file(), "served": served}
    if form == "auto":
        form = "compressed" if held["compressed"] else "served"
    if held[form]:
        return form
    other = next((f for f, ok in held.items() if ok), None)
    fix = f"use eval.salr_form={other}" if other else \
        "re-run the training in a new directory with export.formats=null (every folder)"
    folders = {"compressed": "compressed/", "served": "model/ with adapter/"}
    raise ConfigError(f"run_dir={run_dir} is a salr run without {folders[form]} (export.formats left it out), which "
                      f"eval.salr_form={form} evaluates; {fix}.")


def _load_sparse_run(cfg: RootConfig, run_dir: Path, device: torch.device,
                     identity: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """A salr run in the form ``eval.salr_form`` picks: ``compressed/`` through ``load_salr_export`` (with
    ``eval.base_format``), or ``model/`` with ``adapter/`` on top through PEFT (what a server runs)."""
    if cfg.eval.weights == "adapter":
        raise ConfigError(f"run_dir={run_dir} is a salr run, whose trained model is its sparse base with the fused "
                          "adapter on top in either form: choose with eval.salr_form=served (model/ + adapter/ "
                          "through PEFT) or eval.salr_form=compressed, and leave eval.weights=merged (the LoRA "
                          "family's choice).")
    form = _salr_form(cfg.eval.salr_form, run_dir)
    if form == "compressed":
        compressed = run_dir / "compressed"
        model = load_salr_export(compressed, base_format=cfg.eval.base_format, device=device)
        tokenizer = load_tokenizer(replace(cfg.model, name_or_path=str(compressed), fallback=None))
        identity |= {"model_dir": str(compressed.resolve()), "adapter": str(compressed.resolve()),
                     "salr_form": form, "base_format": cfg.eval.base_format, "base_formats": base_formats(model)}
        return model, tokenizer, identity
    model_dir, adapter_dir = run_dir / "model", run_dir / "adapter"
    base, tokenizer = load_model(replace(cfg.model, name=run_dir.name, name_or_path=str(model_dir), fallback=None),
                                 device)
    identity |= {"model_dir": str(model_dir.resolve()), "adapter": str(adapter_dir.resolve()), "salr_form": form}
    return _peft_on(base, adapter_dir), tokenizer, identity


def _load_run(cfg: RootConfig, run_dir: Path, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    summary_path = run_dir / "summary.json"
    summary = _read_json(summary_path) if summary_path.is_file() else {}
    identity: dict[str, Any] = {"run_dir": str(run_dir.resolve()), "method": summary.get("method"),
                                "weights": cfg.eval.weights}
    if _serves_base_with_adapter(summary.get("exports") or {}):
        return _load_sparse_run(cfg, run_dir, device, identity)
    if cfg.eval.weights == "adapter":
        adapter_dir = run_dir / "adapter"
        if not (adapter_dir / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"eval.weights=adapter, but run_dir={run_dir} has no adapter/{ADAPTER_CONFIG} (methods "
                              "such as loraprune export only the pruned model/). Use eval.weights=merged.")
        if (run_dir / "model" / ADAPTER_CONFIG).is_file():
            raise ConfigError(f"run_dir={run_dir}: model/ already carries the adapter unmerged (salr: sparse base + "
                              "adapter), so eval.weights=merged evaluates exactly base + adapter; use it.")
        base_cfg = run_model_config(run_dir, cfg.model)
        base, tokenizer = load_model(base_cfg, device)
        identity |= {"base_model": base_cfg.name_or_path, "adapter": str(adapter_dir.resolve())}
        return _peft_on(base, adapter_dir), tokenizer, identity
    model_dir = _exported_model_dir(run_dir)
    trust = _has_custom_code(model_dir)
    if trust:
        log.info("%s names its own modelling code (auto_map): loading with trust_remote_code=True", model_dir)
    model_cfg = replace(cfg.model, name=run_dir.name, name_or_path=str(model_dir), fallback=None,
                        trust_remote_code=trust or cfg.model.trust_remote_code)
    model, tokenizer = load_model(model_cfg, device)
    embedded = (model_dir / ADAPTER_CONFIG).is_file()
    identity |= {"model_dir": str(model_dir.resolve()), "adapter": str(model_dir.resolve()) if embedded else None,
                 "trust_remote_code": model_cfg.trust_remote_code}
    return model, tokenizer, identity


def _load_named(cfg: RootConfig, device: torch.device) -> tuple[Any, Any, dict[str, Any]]:
    path = Path(cfg.model.name_or_path).expanduser()
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
        base_id = _read_json(path / ADAPTER_CONFIG).get("base_model_name_or_path")
        if not base_id:
            raise ConfigError(f"model.name_or_path={path} is a PEFT adapter without base_model_name_or_path in "
                              f"{ADAPTER_CONFIG}; give the base with model.name_or_path and evaluate it merged.")
        base, tokenizer = load_model(replace(cfg.model, name_or_path=base_id), device)
        return _peft_on(base, path), tokenizer, {"base_model": base_id, "adapter": str(path.resolve())}
    custom_code = path.is_dir() and (path / "config.json").is_file() and _has_custom_code(path)
    if custom_code and not cfg.model.trust_remote_code:
        raise ConfigError(f"model.name_or_path={path} names its own modelling code (auto_map in config.json). If "
                          "you trust that code, add model.trust_remote_code=true.")
    model, tokenizer = load_model(cfg.model, device)
    embedded = path.is_dir() and (path / ADAPTER_CONFIG).is_file()
    return model, tokenizer, {"adapter": str(path.resolve()) if embedded else None,
                              "trust_remote_code": cfg.model.trust_remote_code}


def _run_config(run_dir: Path) -> dict[str, Any]:
    """The run's composed config (``.hydra/config.yaml``) as plain data; ``{}`` when it has none."""
    path = run_dir / ".hydra" / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}


def run_eval_config(run_config: dict[str, Any], current: EvalConfig, overridden: Sequence[str]) -> EvalConfig:
    """The run's ``eval`` section with the keys in ``overridden`` (``eval.limit``, ``eval``...) from ``current``.

    Keys the run's config lacks (written by an older version) keep ``current``'s values.
    """
    if any(key == "eval" for key in overridden) or not isinstance(run_config.get("eval"), dict):
        return current
    known = {f.name for f in fields(EvalConfig)}
    merged = OmegaConf.merge(OmegaConf.structured(current),
                             {k: v for k, v in run_config["eval"].items() if k in known})
    now = OmegaConf.structured(current)
    for key in overridden:
        path = key.removeprefix("eval.")
        OmegaConf.update(merged, path, OmegaConf.select(now, path), merge=False)
    return OmegaConf.to_object(merged)


def _default_tasks(cfg: RootConfig, run_config: dict[str, Any], overridden: Sequence[str]) -> list[str]:
    user_set = any(key in ("eval", "eval.tasks") for key in overridden)
    if cfg.eval.tasks is not None and (user_set or cfg.run_dir is None):
        return list(cfg.eval.tasks)
    if cfg.run_dir is not None:
        summary = Path(cfg.run_dir).expanduser() / "summary.json"
        tasks = list(_read_json(summary).get("eval") or {}) if summary.is_file() else []
        if tasks:
            return tasks
        if cfg.eval.tasks is not None:
            return list(cfg.eval.tasks)
        run_tasks = (run_config.get("task") or {}).get("eval_tasks")
        if run_tasks:
            return list(run_tasks)
    return list(cfg.task.eval_tasks)


def run_eval(cfg: RootConfig, out_dir: Path, eval_overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Load the model named by ``run_dir`` or ``model``, evaluate it and return ``{task: {metric: value}}``.

    Args:
        eval_overrides: The ``eval`` keys set on the command line; with ``run_dir`` every other ``eval`` key
            comes from the run's own config.
    """
    run_config = _run_config(Path(cfg.run_dir).expanduser()) if cfg.run_dir is not None else {}
    if run_config:
        cfg = replace(cfg, eval=run_eval_config(run_config, cfg.eval, eval_overrides))
    validate(cfg)
    tasks = _default_tasks(cfg, run_config, eval_overrides)
    device = resolve_device(cfg.train.device)
    if cfg.run_dir is not None:
        model, tokenizer, identity = _load_run(cfg, Path(cfg.run_dir).expanduser(), device)
        model_id = identity.get("model_dir") or identity.get("adapter") or str(cfg.run_dir)
    else:
        model, tokenizer, identity = _load_named(cfg, device)
        model_id = cfg.model.name_or_path
    model.eval()
    settings = f" with the run's evaluation settings (eval.limit={cfg.eval.limit})" if run_config else ""
    log.info("evaluating %s on %s%s", model_id, ", ".join(tasks), settings)
    results = evaluate(model, tokenizer, tasks, cfg.eval, cfg.data, out_dir, model_id=model_id, identity=identity,
                       autocast_dtype=torch.bfloat16 if cfg.train.bf16 else None, progress=cfg.logging.progress)
    log_eval_run(cfg.logging, out_dir, results, name=f"eval-{Path(model_id).name}",
                 config={"model": identity | {"name_or_path": model_id}, "eval": OmegaConf.to_container(
                     OmegaConf.structured(cfg.eval))})
    return results
