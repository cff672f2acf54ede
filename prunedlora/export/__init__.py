"""What a run deploys, one module per format it writes.

| module | folder | what it holds |
|---|---|---|
| ``hf`` | ``model/`` | a Hugging Face model directory (``save_pretrained``): merged LoRA-family models |
| ``peft_adapter`` | ``adapter/`` | a PEFT LoRA adapter (active ranks; SALR's residual and task adapters fused) |
| ``pruned_llama`` | ``model/`` | LoRAPrune's per-layer pruned LLaMA (``trust_remote_code`` modelling file) |
| ``uniform_llama`` | ``model/`` | LoRAPrune's uniform pruned model: a plain checkpoint of the base's architecture |
| ``bitmap`` | ``model/`` (SALR) | the pruned matrices in bitmap form and the size report |

Methods call these from their ``export``; this package imports adapters, pruning and models, never methods.
"""

from prunedlora.export.hf import dequantize_base, save_merged_model, save_pretrained_dir
from prunedlora.models.load import count_parameters

__all__ = ["count_parameters", "dequantize_base", "save_merged_model", "save_pretrained_dir"]
