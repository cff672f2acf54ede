"""prunedlora: LoRA-family fine-tuning that prunes while it trains."""

__version__ = "0.1.0"
