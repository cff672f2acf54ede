"""The ``model=tiny`` preset: a random LLaMA and a byte-level tokenizer, both built in memory.

Nothing here touches the disk or the network, so unit tests and smoke runs work on any machine. The
tokenizer maps every byte to one token (no merges), which makes it lossless for any UTF-8 text and
keeps the vocabulary at 259 entries, so the whole model stays around 150k parameters.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from prunedlora.config import ConfigError, TinyModelConfig

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<pad>", "<s>", "</s>"
# Special tokens take the first ids so that byte ``b`` is always token ``b + NUM_SPECIAL``.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256
MODEL_MAX_LENGTH = 512


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet the ByteLevel pre-tokenizer emits.

    ``tokenizers`` exposes the alphabet only as an unordered list; rebuilding the table gives the
    vocabulary a readable order (token id = byte value + ``NUM_SPECIAL``).
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # control bytes and space are shifted above 255 so every token is visible
            table[b] = chr(256 + extra)
            extra += 1
    return table


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Build a lossless byte-level tokenizer entirely in memory.

    A BPE model with no merges over the 256-symbol ByteLevel alphabet, ByteLevel pre-tokenizer and
    decoder, special tokens ``<pad>`` (0), ``<s>`` (1, bos) and ``</s>`` (2, eos), and a
    TemplateProcessing post-processor that prepends ``<s>`` (``add_special_tokens=False`` skips it).

    Note: transformers 5 does not persist the ``add_bos_token`` flag in ``tokenizer_config.json``, so a
    reloaded copy reports ``add_bos_token=False``; the behaviour lives in the post-processor inside
    ``tokenizer.json`` and survives the round trip. Test behaviour, not the flag.

    Returns:
        A fast tokenizer with ``model_max_length`` 512 that round-trips any UTF-8 string and can be
        saved with ``save_pretrained`` and reloaded with ``AutoTokenizer.from_pretrained``.
    """
    vocab = {PAD_TOKEN: PAD_ID, BOS_TOKEN: BOS_ID, EOS_TOKEN: EOS_ID}
    for byte, char in _bytes_to_unicode().items():
        vocab[char] = byte + NUM_SPECIAL
    assert set(vocab) - {PAD_TOKEN, BOS_TOKEN, EOS_TOKEN} == set(pre_tokenizers.ByteLevel.alphabet())

    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # add_prefix_space=False keeps decode(encode(s)) == s for strings that start with a word.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN}:1 $B:1", special_tokens=[(BOS_TOKEN, BOS_ID)]
    )
    backend.add_special_tokens([PAD_TOKEN, BOS_TOKEN, EOS_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MODEL_MAX_LENGTH,
        add_bos_token=True,
        add_eos_token=False,
    )


def _check_shape(cfg: TinyModelConfig) -> None:
    """Reject shapes LlamaConfig would accept but the attention code cannot run."""
    if cfg.num_attention_heads <= 0 or cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"model.tiny.hidden_size={cfg.hidden_size} is not divisible by model.tiny.num_attention_heads="
            f"{cfg.num_attention_heads}: the head dimension must be an integer. Pick a hidden size that is a "
            "multiple of the head count (the default is hidden_size=64 with 4 heads)."
        )
    if cfg.num_key_value_heads <= 0 or cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ConfigError(
            f"model.tiny.num_key_value_heads={cfg.num_key_value_heads} does not divide model.tiny."
            f"num_attention_heads={cfg.num_attention_heads}: grouped-query attention needs every KV head to "
            "serve the same number of query heads. Use a divisor of the head count (the default is 2 of 4)."
        )


def build_tiny_llama(cfg: TinyModelConfig, vocab_size: int) -> LlamaForCausalLM:
    """Build a random float32 LLaMA with grouped-query attention, deterministic in ``cfg.init_seed``.

    Args:
        cfg: The shape (``model.tiny``): hidden size, layers, query and KV heads, MLP width, positions.
        vocab_size: Embedding rows; pass ``len(build_byte_tokenizer())``.

    Returns:
        A ``LlamaForCausalLM`` with untied embeddings and the byte tokenizer's pad/bos/eos ids.

    Raises:
        ConfigError: When the head counts do not divide the hidden size or each other.
    """
    _check_shape(cfg)
    if vocab_size < NUM_SPECIAL:
        raise ValueError(f"vocab_size={vocab_size} cannot hold the {NUM_SPECIAL} special tokens")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        # Untied so that adapters/pruning on lm_head never silently edit the input embeddings.
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        dtype="float32",
    )
    # fork_rng restores the global CPU RNG afterwards, so building a model never shifts the data
    # order or dropout masks of the caller; devices=[] avoids touching (or initialising) CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        model = LlamaForCausalLM(config)
    return model.to(torch.float32)
