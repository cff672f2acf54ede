"""Plain LoRA (Hu et al., 2021): ``config.py`` (options, registration), ``method.py`` (``LoraMethod``, and the
LoRA-style attach, report and export steps that DropLoRA, PrunedLoRA and LoRAPrune reuse)."""

from prunedlora.methods.lora.config import LoraConfig
from prunedlora.methods.registry import lazy_attributes

__getattr__ = lazy_attributes(__name__, dict.fromkeys(("LoraMethod", "attach_lora", "export_lora", "rank_report"),
                                                      ".method"))
__all__ = ["LoraConfig", "LoraMethod", "attach_lora", "export_lora", "rank_report"]  # noqa: F822
