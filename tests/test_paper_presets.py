"""The paper presets (``configs/experiment/paper_*``) compose, validate and say what they follow; their
hub-only training sets (MetaMathQA, LaMini) parse from hub rows and from local copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from prunedlora.configs import __file__ as configs_init
from recipe_helpers import compose_root

from prunedlora.config import DataConfig
from prunedlora.data.datasets import load_records
from prunedlora.data.formatting import format_example
from prunedlora.pruning.schedules import target_fraction
from prunedlora.validation import validate

PRESETS = ["paper_prunedlora_gsm8k", "paper_droplora_gsm8k", "paper_loraprune_wikitext", "paper_salr_gsm8k"]


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_validates_and_cites(preset):
    cfg = compose_root([f"experiment={preset}"])
    validate(cfg)
    text = (Path(configs_init).parent / "experiment" / f"{preset}.yaml").read_text()
    assert "docs/methods.md" in text and "Compare with" in text  # cites its setting and the headline to compare
    assert cfg.train.bf16 and cfg.train.max_steps >= 3000


def test_prunedlora_preset_reaches_the_paper_ranks():
    cfg = compose_root(["experiment=paper_prunedlora_gsm8k"])
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B" and cfg.task.max_samples == 100_000
    assert (cfg.method.init_rank, cfg.method.final_rank(cfg.sparsity.final)) == (512, 64)
    # 448 components, 2 per event every 10 steps: the target rank is reached at step 2240 of 5000
    events = (512 - 64) // cfg.sparsity.per_event
    assert events * cfg.sparsity.every == 2240 < cfg.train.max_steps
    assert cfg.method.alpha / cfg.method.init_rank == 2


def test_loraprune_preset_is_the_authors_script():
    cfg = compose_root(["experiment=paper_loraprune_wikitext"])
    assert cfg.model.name_or_path == "huggyllama/llama-7b" and cfg.task.dataset == "lamini"
    assert (cfg.method.rank, cfg.method.alpha, cfg.method.criterion) == (8, 16, "lora_guided")
    # the paper's pipeline, not the project's defaults: progressive masks, no re-fit, free head choice, cross-entropy
    assert (cfg.method.schedule(cfg.sparsity), cfg.method.refit, cfg.method.gqa_balanced, cfg.recovery.name) == (
        "cubic", False, False, "ce")
    assert cfg.train.batch_size * cfg.train.grad_accum == 128 and cfg.eval.seqlen == 128
    # cubic: nothing during the first 10%, the full 50% for the last 10%
    steps = cfg.train.max_steps
    assert target_fraction(cfg.sparsity, 100, steps, default="cubic") == 0
    assert target_fraction(cfg.sparsity, steps - 100, steps, default="cubic") == pytest.approx(0.5)


def test_loraprune_defaults_are_the_measured_pipeline():
    """``method=loraprune`` alone: the one-shot cut (``sparsity.schedule=auto``) scored by ``activation``, re-fitted,
    with balanced GQA groups, then the even mix of cross-entropy and distillation (docs/RESULTS.md, "Recovery")."""
    cfg = compose_root(["method=loraprune"])
    validate(cfg)
    assert (cfg.sparsity.schedule, cfg.method.schedule(cfg.sparsity)) == ("auto", "one_shot")
    assert (cfg.method.criterion, cfg.method.refit, cfg.method.gqa_balanced, cfg.method.structure) == (
        "activation", True, True, "per_layer")
    assert (cfg.recovery.name, cfg.recovery.alpha) == ("mix", 0.5)
    progressive = compose_root(["method=loraprune", "sparsity=cubic"])
    assert progressive.method.schedule(progressive.sparsity) == "cubic"


def test_droplora_and_salr_presets():
    drop = compose_root(["experiment=paper_droplora_gsm8k"])
    assert drop.method.target_modules == ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
    assert (drop.method.rank, drop.method.alpha, drop.method.p, drop.train.scheduler) == (64, 128, 0.5, "linear")
    assert drop.distributed.name == "deepspeed_zero2"
    salr = compose_root(["experiment=paper_salr_gsm8k"])
    assert (salr.method.rank, salr.method.residual_rank, salr.sparsity.final) == (64, 64, 0.5)
    assert salr.method.base_criterion == "magnitude"  # the paper's, not the project's default
    assert salr.recovery.name == "ce"  # the paper's objective (the project's default for salr: mix)


def test_metamathqa_rows_become_gsm8k_style_records(tmp_path):
    rows = [{"query": "What is 2 + 3?", "response": "2 + 3 = 5.\nThe answer is: 5", "type": "GSM_AnsAug"},
            {"query": "No final line?", "response": "Just text."}]
    path = tmp_path / "MetaMathQA-395K.json"
    path.write_text(json.dumps(rows))
    records = load_records("metamathqa", "train", DataConfig(hub=False), str(path))
    assert records == [{"question": "What is 2 + 3?", "answer": "2 + 3 = 5.\n#### 5"},
                       {"question": "No final line?", "answer": "Just text."}]
    prompt, target = format_example("metamathqa", records[0])
    assert prompt == "Question: What is 2 + 3?\nAnswer:" and target == " 2 + 3 = 5.\n#### 5"


def test_lamini_from_a_local_jsonl_copy_in_the_alpaca_template(tmp_path):
    path = tmp_path / "lamini.jsonl"
    path.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi!", "instruction_source": "x"}) + "\n")
    records = load_records("lamini", "train", DataConfig(hub=False), str(path))
    assert records == [{"instruction": "Say hi.", "response": "Hi!"}]
    prompt, target = format_example("lamini", records[0])
    assert prompt.endswith("### Instruction:\nSay hi.\n\n### Response:\n") and target == "Hi!"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "no instruction"}) + "\n")
    with pytest.raises(Exception, match="instruction"):
        load_records("lamini", "train", DataConfig(hub=False), str(bad))


def test_hub_only_sets_name_the_fix_when_offline():
    with pytest.raises(Exception, match="task.path"):
        load_records("metamathqa", "train", DataConfig(hub=False))
