"""Model loading: the random ``tiny`` LLaMA, local directories, hub ids and the offline SmolLM2 copy.

Import from here; the submodules are an implementation detail. Importing this package does not import
bitsandbytes (quantized loads import it lazily).
"""

from prunedlora.models.load import (
    count_parameters,
    hub_reachable,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_model_path,
)
from prunedlora.models.smollm2 import smollm2_offline_dir
from prunedlora.models.tiny import build_byte_tokenizer, build_tiny_llama

__all__ = [
    "build_byte_tokenizer",
    "build_tiny_llama",
    "count_parameters",
    "hub_reachable",
    "load_model",
    "load_tokenizer",
    "resolve_device",
    "resolve_model_path",
    "smollm2_offline_dir",
]
