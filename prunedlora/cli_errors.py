"""Every error the command line can meet, said in one voice: one paragraph naming the key, the value and the fix.

Hydra and OmegaConf report bad overrides in their own words (and suggest ``+key`` for a misspelt key, which
adds a key the code never reads). :func:`explain` turns those exceptions, and the file-system errors of a
run directory that cannot be written, into the project's paragraph; the CLI prints it and exits 2. The
valid keys come from the typed schemas (``prunedlora.config`` and each registered method's), so suggestions never
drift from the code.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing

from prunedlora.config import EVAL_TASKS, MethodConfig, RootConfig
from prunedlora.methods.registry import method_specs

DEBUG_HINT = "Add debug=true for the full traceback."
EVAL_USAGE = (
    "prunedlora-eval needs to know what to evaluate: a finished run (prunedlora-eval run_dir=<run dir>, which "
    "reuses that run's evaluation settings) or any Hugging Face causal LM (prunedlora-eval model=hf "
    "model.name_or_path=<hub id or local dir>). Add eval.tasks=[gsm8k,wikitext2] and eval.limit=N to choose "
    "the tasks and the budget; prunedlora-eval --help lists every option."
)


TYPE_FIX = "Give {key} a value of the type it expects; prunedlora-train --cfg job shows every key with its value."


def _first_line(exc: BaseException) -> str:
    """An OmegaConf message without the ``full_key:``/``object_type=`` lines it appends."""
    return str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__


def paragraph(text: str) -> str:
    """``text`` as one paragraph: line breaks and indentation from library messages folded into spaces."""
    return re.sub(r"\s*\n\s*", " ", text.strip())


# ------------------------------------------------------------------------------------------ valid keys
def _schema_keys(schema: type, prefix: str) -> list[str]:
    """Dotted keys of a dataclass schema, nested dataclasses expanded."""
    keys = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        keys.append(key)
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind):
            keys += _schema_keys(kind, key + ".")
    return keys


def valid_keys(method_schema: type | None = None) -> list[str]:
    """Every settable key: the root schema with ``method`` expanded for ``method_schema`` (all methods if None)."""
    keys = [k for k in _schema_keys(RootConfig, "") if k != "method"]
    methods = [method_schema] if method_schema is not None else [spec.schema for spec in method_specs().values()]
    for schema in methods:
        keys += [k for k in _schema_keys(schema, "method.") if k not in keys]
    keys += [f"eval.task_limits.{task}" for task in EVAL_TASKS]
    from hydra.conf import HydraConf  # hydra.run.dir, hydra.sweep.dir, ... (Hydra's own schema)

    return keys + _schema_keys(HydraConf, "hydra.")


def _method_schema(cause: BaseException | None) -> type | None:
    object_type = getattr(cause, "object_type", None)
    return object_type if isinstance(object_type, type) and issubclass(object_type, MethodConfig) else None


def _unknown_key(key: str, value: str, cause: BaseException | None) -> str:
    """A key that does not exist: nearest valid keys, or the methods that do have it."""
    schema = _method_schema(cause)
    candidates = valid_keys(schema)
    specs = method_specs().values()
    method = next((spec.name for spec in specs if spec.schema is schema), None)
    owners = [spec.name for spec in specs if key in _schema_keys(spec.schema, "method.")]
    where = f" of method={method}" if method else ""
    if owners and method not in owners:
        return (f"{key}={value}: {key} is not a key{where}; it belongs to "
                f"{' and '.join(f'method={owner}' for owner in owners)}. Choose one of those methods, or drop the "
                "override.")
    close = difflib.get_close_matches(key, candidates, n=2, cutoff=0.6)
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    siblings = sorted({k[len(parent) + 1:].split(".")[0] for k in candidates if parent and k.startswith(parent + ".")})
    hint = f" Did you mean {' or '.join(close)}?" if close else ""
    owner = f"method={method}" if parent == "method" and method else parent
    listing = f" Keys of {owner}: {', '.join(siblings)}." if siblings else ""
    return f"{key}={value}: there is no key {key}{where}.{hint}{listing}"


# ------------------------------------------------------------------------------------------ explain
def _override_value(argv: list[str], key: str) -> str:
    for arg in argv:
        name, sep, value = arg.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return "?"


def _from_hydra(exc: BaseException, argv: list[str]) -> str | None:
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and getattr(exc, "options", None) is not None:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        close = difflib.get_close_matches(option, exc.options, n=1, cutoff=0.5)
        hint = f" Did you mean {group}={close[0]}?" if close else ""
        return f"{group}={option} is not an option of the {group} group.{hint} Options: {', '.join(exc.options)}."
    if isinstance(exc, OverrideParseException):
        return (f"Cannot read the override {exc.override!r}: {paragraph(exc.message.split('See https')[0])}. Write "
                "it as key=value; quote values with brackets, commas or spaces for the shell, e.g. "
                "'method.target_modules=[q_proj,v_proj]'.")
    text = str(exc)
    cause = exc.__cause__
    if (found := re.match(r"Could not override '([^']+)'", text)) or "not in struct" in str(cause):
        key = found.group(1) if found else str(getattr(cause, "full_key", "?"))
        return _unknown_key(key, _override_value(argv, key), cause)
    if found := re.match(r"Could not append to config\. An item is already at '([^']+)'", text):
        key = found.group(1)
        return f"+{key}: {key} already exists, so it takes no +; set it with {key}={_override_value(argv, key)}."
    if found := re.match(r"Error merging override (\S+?)=", text):
        key = found.group(1)
        return f"{key}={_override_value(argv, key)}: {_first_line(cause or exc)}. {TYPE_FIX.format(key=key)}"
    if found := re.match(r"Could not delete from config\. '([^']+)'", text):
        return f"~{found.group(1)}: nothing to delete. {paragraph(text)}"
    return None


def explain_omegaconf(exc: BaseException) -> str | None:
    """A missing mandatory value or a bad type found while the composed config is converted."""
    from omegaconf.errors import MissingMandatoryValue, ValidationError

    key = getattr(exc, "full_key", None)
    if isinstance(exc, MissingMandatoryValue) and key:
        what = "<hub id or local dir>" if key == "model.name_or_path" else "<value>"
        return f"{key} has no value and this config needs one; add {key}={what} to the command line."
    if isinstance(exc, ValidationError) and key:
        return f"{key}: {_first_line(exc)}. {TYPE_FIX.format(key=key)}"
    return None


def explain_os_error(exc: OSError) -> str:
    """A run (or evaluation) directory that cannot be created or written."""
    where = exc.filename or "the run directory"
    return (f"Cannot write {where} ({exc.strerror or exc}). The run directory must be writable: choose another "
            "one with hydra.run.dir=<path>, or fix its permissions.")


def explain(exc: BaseException, argv: list[str]) -> str | None:
    """The paragraph for an exception raised before the run started, or None if it is not a user error."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(exc, HydraException):
        return _from_hydra(exc, argv) or paragraph(str(exc)) + (
            f" {paragraph(str(exc.__cause__))}" if exc.__cause__ is not None else "")
    if isinstance(exc, OmegaConfBaseException):
        return explain_omegaconf(exc) or paragraph(str(exc))
    if isinstance(exc, OSError):
        return explain_os_error(exc)
    if isinstance(exc.__cause__, OSError):  # logging.config wraps the log file's error in a ValueError
        return explain_os_error(exc.__cause__)
    return None


def format_error(text: str) -> str:
    """The one printed paragraph: ``prunedlora: error: ...`` ending with how to see the traceback."""
    return f"prunedlora: error: {paragraph(text)} {DEBUG_HINT}"


def debug_requested(argv: list[str]) -> bool:
    """``debug=true`` on the command line (read before Hydra composes, so its own errors can be traced too)."""
    return any(re.fullmatch(r"\+*debug=(true|True|1|yes)", arg) for arg in argv)


def override_keys(argv: list[str]) -> list[str]:
    """The keys the command line sets (``model.rank=4`` -> ``model.rank``; flags and their values skipped)."""
    return [arg.lstrip("+~").partition("=")[0] for arg in argv if "=" in arg and not arg.startswith("-")]
