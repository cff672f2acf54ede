"""``python -m scripts.check_serving`` without vLLM: every row's training composes and validates (a typo would surface
after minutes of a run), the transformers side decodes exactly the asked tokens, and the report reads vLLM's
logs and token lists right. The vLLM side itself runs only under ``make check-serving`` (a 2.5 GB environment)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from recipe_helpers import compose_root
from transformers import LlamaConfig, LlamaForCausalLM

from prunedlora.validation import validate
from scripts import check_serving, serve_vllm


@pytest.mark.parametrize("label", sorted(check_serving.RUNS))
def test_every_run_composes_and_validates(label: str) -> None:
    case = check_serving.RUNS[label]
    if case.needs and not check_serving._has_field(*case.needs):
        pytest.skip(f"{case.needs[0]} has no field {case.needs[1]} at this commit: the row reports it as unavailable")
    cfg = compose_root([*check_serving.TRAIN, "train.max_steps=16", *check_serving._overrides(case)])
    validate(cfg)
    assert cfg.model.name == "smollm2_135m" and not cfg.train.bf16 and not cfg.eval.enabled
    assert cfg.method.name == label.split("-")[0]
    if "structure" in {f.name for f in dataclasses.fields(cfg.method)}:
        assert cfg.method.structure == label.split("-")[1]


def test_rows_that_reuse_a_run_name_one() -> None:
    for case in check_serving.CASES:
        assert case.run is None or case.run in check_serving.RUNS, case.label
        assert case.serve in check_serving.SERVED, case.label


def test_agreement_counts_equal_prompts_and_the_earliest_difference() -> None:
    assert check_serving.agreement([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]) == "2/2"
    ours, theirs = [[1, 2, 3], [4, 5, 6], [7, 8]], [[1, 2, 3], [4, 9, 6], [0, 8]]
    assert check_serving.agreement(ours, theirs) == "1/3 (earliest difference at token 0)"
    assert check_serving.agreement([[1, 2, 3]], [[1, 2]]) == "0/1 (earliest difference at token 2)"


def test_first_logged_error_skips_vllms_wrappers(tmp_path: Path) -> None:
    log = tmp_path / "x.vllm.log"
    log.write_text(
        "(EngineCore pid=2) INFO 12-07 17:53:50 [core.py:1] Initializing\n"
        "(Worker pid=3) ERROR 12-07 17:53:58 [multiproc_executor.py:953] Traceback (most recent call last):\n"
        "(Worker pid=3) ERROR 12-07 17:53:58 [multiproc_executor.py:953] ValueError: Unrecognized configuration "
        "class PrunedLlamaConfig\n"
        "(EngineCore pid=2) ERROR 12-07 17:54:03 [core.py:1510] Exception: WorkerProc initialization failed due to\n"
        "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert check_serving.first_logged_error(log) == "ValueError: Unrecognized configuration class PrunedLlamaConfig"
    log.write_text("(EngineCore pid=2) ERROR 1 [core.py:1] Exception: WorkerProc initialization failed\n")
    assert check_serving.first_logged_error(log) is None


def test_lora_rank_slot_is_the_smallest_rank_vllm_accepts(tmp_path: Path) -> None:
    assert [serve_vllm.lora_rank_slot(r) for r in (1, 2, 8, 9, 16, 17, 512)] == [1, 8, 8, 16, 16, 32, 512]
    with pytest.raises(ValueError, match="exceeds"):
        serve_vllm.lora_rank_slot(513)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 8, "rank_pattern": {"q_proj": 24}}))
    assert serve_vllm.adapter_rank(str(tmp_path)) == 24


def _tiny_folder(path: Path) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, eos_token_id=None))
    model.save_pretrained(path)
    return model, path


def test_transformers_side_decodes_exactly_the_tokens_asked_even_through_eos(tmp_path: Path) -> None:
    model, folder = _tiny_folder(tmp_path / "model")
    prompt = [3, 5, 7, 11]
    with torch.no_grad():  # the plain greedy continuation, to learn which token comes first
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": first}))
    out = check_serving.transformers_decode(folder, None, [prompt, prompt[:2]], tokens=6)
    assert out["ok"] and [len(t) for t in out["tokens"]] == [6, 6] and out["tokens"][0][0] == first
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None)
    assert out["tokens"][0] == reference[0, len(prompt):].tolist()


def test_transformers_side_refuses_a_model_folder_that_holds_an_adapter(tmp_path: Path) -> None:
    _, folder = _tiny_folder(tmp_path / "model")
    (folder / "adapter_config.json").write_text("{}")
    out = check_serving.transformers_decode(folder, tmp_path / "adapter", [[1, 2]], tokens=2)
    assert not out["ok"] and "adapter_config.json" in out["error"]
