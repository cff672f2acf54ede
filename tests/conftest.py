"""Shared fixtures: the local data mirror and a small real (byte-level) tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _data_root() -> Path:
    # PRUNEDLORA_DATA_ROOT wins (as in the config); else ../shared/data next to the project root.
    env = os.environ.get("PRUNEDLORA_DATA_ROOT")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The local data mirror; tests that need it skip only where it is absent (CI always has it)."""
    root = _data_root()
    if not root.is_dir():
        pytest.skip(f"local data mirror not found at {root} (set PRUNEDLORA_DATA_ROOT)")
    return root


@pytest.fixture(scope="session")
def byte_tokenizer():
    """Lossless byte-level BPE tokenizer built in memory (bos ``<s>`` added, eos ``</s>``, pad ``<pad>``)."""
    from prunedlora.models.tiny import build_byte_tokenizer

    return build_byte_tokenizer()


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors run faster on one thread, and the suite shares 2 cores with its own subprocesses."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny(byte_tokenizer):
    """The random tiny LLaMA (default ``TinyModelConfig``) sized to the byte tokenizer; one per test module."""
    from prunedlora.config import TinyModelConfig
    from prunedlora.models.tiny import build_tiny_llama

    return build_tiny_llama(TinyModelConfig(), vocab_size=len(byte_tokenizer))



@pytest.fixture(autouse=True, scope="session")
def _bnb_cpu_repack_switch():
    """``PRUNEDLORA_TEST_BNB_REPACK=off``: the in-process tests run as on a CPU without AVX512-BF16, where
    bitsandbytes never repacks 4-bit weights for its CPU kernel (``bnb_layouts.py``). Unset: the CPU decides."""
    value = os.environ.get("PRUNEDLORA_TEST_BNB_REPACK", "")
    if value not in ("", "off"):
        raise pytest.UsageError(f"PRUNEDLORA_TEST_BNB_REPACK={value!r}: use off (or leave it unset)")
    if value != "off":
        yield
        return
    from bnb_layouts import no_cpu_repack

    with no_cpu_repack():
        yield
