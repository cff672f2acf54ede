"""What ``python -m scripts.compare`` runs: the suites (runs, metrics, the papers' claims) and the budgets.

A suite's runs differ only in their method overrides; model, data, seed, steps, batch and evaluation come from
the budget, identical for every run of a suite. A row names every setting its label stands for, so a default that
changes later does not change what a label measures (LoRAPrune's ``PAPER_LAYOUT``, ``recovery=ce``). The papers'
numbers quoted here are those collected in ``docs/methods.md`` (sections 3.6, 4.4, 5.5, 6.5).
"""

from __future__ import annotations

from scripts.loraprune_suites import (
    PAPER_LAYOUT,
    recovery_runs,
    recovery_verdicts,
    structure_runs,
    structure_verdicts,
)
from scripts.seed_stats import paired, series_values
from scripts.suite_types import Run, Suite, compare, value

ALL_LINEARS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
"""Every method adapts the same seven projections (LoRAPrune's and SALR's own setting), so the adapters sit in
the same places and only the method differs."""


# ------------------------------------------------------------------------------------------------ budgets
_COMMON = ["model=smollm2_135m", f"method.target_modules={ALL_LINEARS}", "train.seed=42", "train.bf16=true",
           "train.lr=5e-4", "train.warmup_ratio=0.05", "train.save_every=25", "eval.seqlen=512",
           "eval.num_fewshot=0"]
BUDGETS: dict[str, dict[str, list[str]]] = {
    # budget -> training data -> overrides shared by every run (model, data, seed, steps, batch, evaluation).
    # 2 CPU cores, two 1-thread jobs side by side: the comparison and the sweep in about 45 minutes.
    "cpu": {
        "gsm8k": [*_COMMON, "task=gsm8k", "train.max_steps=60", "train.batch_size=2", "train.seq_len=256",
                  "eval.tasks=[gsm8k_loss,gsm8k,wikitext2,ptb,mmlu]", "eval.max_gen_toks=128",
                  "eval.task_limits={gsm8k_loss:64,gsm8k:16,wikitext2:16,ptb:16,mmlu:57}"],
        "ptb": [*_COMMON, "task=ptb", "train.max_steps=200", "train.batch_size=2", "train.seq_len=256",
                "eval.tasks=[wikitext2,ptb]", "eval.limit=40"],
    },
    # One GPU: 80 times the tokens (600 steps of 8 x 512), the full perplexity test sets, larger eval subsets.
    "gpu": {
        "gsm8k": [*_COMMON, "task=gsm8k", "train.max_steps=600", "train.batch_size=8", "train.seq_len=512",
                  "eval.tasks=[gsm8k_loss,gsm8k,wikitext2,ptb,mmlu]", "eval.max_gen_toks=256",
                  "eval.task_limits={gsm8k_loss:512,gsm8k:250,mmlu:570}", "eval.limit=null"],
        "ptb": [*_COMMON, "task=ptb", "train.max_steps=1000", "train.batch_size=8", "train.seq_len=512",
                "eval.tasks=[wikitext2,ptb]", "eval.limit=null"],
    },
}
# The cpu budget in float32: on CPUs without native bf16 (no AVX512-BF16 or AMX) bf16 autocast runs every GEMM
# about 6x slower than float32 (measured on the AMD EPYC of the issue-12 runs), so it is out of reach there.
BUDGETS["cpu-fp32"] = {data: [o.replace("train.bf16=true", "train.bf16=false") for o in overrides]
                       for data, overrides in BUDGETS["cpu"].items()}


def _budget_text(data: str, budget: str) -> str:
    return " ".join(f"`{o}`" for o in BUDGETS[budget][data])


# ------------------------------------------------------------------------------------------------ runs
def _prunedlora(s: float) -> Run:
    """r0 = 32 pruned 4 components per module every 5 steps down to 32 (1 - s) (0.75: rank 8)."""
    return Run(f"prunedlora-s{s:.2f}", ("method=prunedlora", "recovery=ce", "method.init_rank=32", "sparsity=constant",
                                        f"sparsity.final={s}", "sparsity.every=5", "sparsity.per_event=4"), s)


def _loraprune(s: float, criterion: str = "lora_guided") -> Run:
    suffix = "" if criterion == "lora_guided" else f"-{criterion}"
    return Run(f"loraprune{suffix}-s{s:.2f}", ("method=loraprune", f"method.criterion={criterion}", *PAPER_LAYOUT,
                                               f"sparsity.final={s}", "sparsity.every=5"), s,
               series=f"loraprune ({criterion})" if suffix else None)


def _salr(s: float) -> Run:
    return Run(f"salr-s{s:.2f}", ("method=salr", "recovery=ce", f"sparsity.final={s}"), s)


def _pattern_tag(pattern: str) -> str:
    """The label suffix of a sparsity pattern: nothing for unstructured, ``-2of4`` for 2:4."""
    return "-2of4" if pattern == "2:4" else ""


def _salr_base(criterion: str, pattern: str = "unstructured") -> Run:
    """SALR at 50% with an explicit base criterion (label independent of the default)."""
    tag = _pattern_tag(pattern)
    return Run(f"salr-{criterion}{tag}-s0.50", ("method=salr", f"method.base_criterion={criterion}",
                                               f"method.pattern='{pattern}'", "sparsity.final=0.5", "recovery=ce"),
               0.5,
               series=f"salr ({criterion}{', 2:4' if tag else ''})")


SALR_DEFAULT, SALR_DEFAULT_2OF4 = _salr_base("wanda").label, _salr_base("wanda", "2:4").label
"""The quality suite's rows of SALR's default base criterion (``method.base_criterion``: wanda)."""


def _one_shot(criterion: str, pattern: str = "unstructured") -> Run:
    """Training-free pruning at 50%: SALR's base alone (no residual adapter; the zero-init task LoRA adds
    nothing), evaluated with ``train.max_steps=0``."""
    tag = _pattern_tag(pattern)
    return Run(f"oneshot-{criterion}{tag}-s0.50", ("method=salr", f"method.base_criterion={criterion}",
                                                   f"method.pattern='{pattern}'", "method.residual_rank=0",
                                                   "recovery=ce", "sparsity.final=0.5", "train.max_steps=0"),
               0.5, series=f"one-shot {criterion}{', 2:4' if tag else ''}, no training")


LORA = Run("lora-r8", ("method=lora",), 0.0, series="lora (dense, r=8)")
DROPLORA = Run("droplora-r8-p0.5", ("method=droplora", "method.p=0.5"))
ADALORA = Run("adalora-s0.75", ("method=adalora", "method.init_rank=32", "sparsity.final=0.75"))
BASE = Run("base", ("model=smollm2_135m",), structure="untouched", train=False)


SEEDS = (42, 1, 2)
_R8 = ("recovery=ce", "method.init_rank=32", "method.rank=8")  # ce: LoRA's objective, as the rows were measured
PRUNEDLORA_VARIANTS: dict[str, tuple[str, ...]] = {
    # series -> method overrides; every variant starts at r0 = 32 and ends at rank 8 on all seven projections.
    "lora r8": ("method=lora", "method.rank=8", "method.alpha=16"),
    "prunedlora obs (default)": ("method=prunedlora", *_R8, "sparsity.every=5"),
    "prunedlora paper (obs_grad, both)": ("method=prunedlora", *_R8, "method.criterion=obs_grad",
                                          "method.recovery_factor=both", "sparsity=constant", "sparsity.every=5",
                                          "sparsity.per_event=4"),
    "prunedlora magnitude": ("method=prunedlora", *_R8, "method.criterion=magnitude", "sparsity.every=5"),
    "lora r16": ("method=lora", "method.rank=16", "method.alpha=32"),
}
_VARIANT_LABELS = {"lora r8": "lora-r8", "prunedlora obs (default)": "prunedlora-obs-32to8",
                   "prunedlora paper (obs_grad, both)": "prunedlora-paper-32to8",
                   "prunedlora magnitude": "prunedlora-magnitude-32to8", "lora r16": "lora-r16-a32"}


def _seeded(series: str, seed: int) -> Run:
    return Run(f"{_VARIANT_LABELS[series]}-seed{seed}", (*PRUNEDLORA_VARIANTS[series], f"train.seed={seed}"),
               series=series, seed=seed)


def _prunedlora_runs() -> tuple[Run, ...]:
    """In order of what the verdicts need first, so a measurement cut short still answers the main question:
    the default and LoRA r8 paired per seed, then magnitude, then the paper's variant and LoRA r16."""
    r8, obs, paper, mag, r16 = PRUNEDLORA_VARIANTS
    order = [(s, v) for s in SEEDS for v in (obs, r8)] + [(s, mag) for s in SEEDS] + [(42, paper), (42, r16)]
    order += [(s, paper) for s in SEEDS[1:]] + [(s, r16) for s in SEEDS[1:]]
    return tuple(_seeded(series, seed) for seed, series in order)


def _prunedlora_setup(budget: str) -> str:
    precision = "float32" if "train.bf16=false" in BUDGETS[budget]["gsm8k"] else "bf16 autocast"
    return (f"Every run: SmolLM2-135M-Instruct, GSM8K train, the same steps, batch, tokens and learning rate, adapters "
            f"on all seven projections, {precision}; runs of one seed see the same batches in the same order. "
            f"Overrides shared by every run: {_budget_text('gsm8k', budget)}. Held-out loss = mean answer-token NLL "
            "on the first 64 GSM8K test answers (the training format; per-run stderr about 0.03, mostly the spread "
            "between answers, which paired runs share); WikiText-2 token perplexity on the first 16 windows of 512. "
            "Variants: LoRA r8 (alpha 16) and r16 (alpha 32); PrunedLoRA r0 = 32 (alpha "
            "64, scaling 2) pruned to rank 8 with (i) the default criterion `obs` (output OBS, B-only recovery) and "
            "the default geometric schedule (every 5 steps the same fraction of the remaining rank, 32 -> 26 -> "
            "22 -> 18 -> 14 -> 12 -> 10 -> 8 at steps 5-35, then 25 steps at rank 8), (ii) the paper's variant "
            "(`criterion=obs_grad`, two-sided recovery, 4 components every 5 steps: rank 8 at step 30), (iii) "
            "`criterion=magnitude` with the default schedule (so (i) vs (iii) isolates the criterion). Seeds "
            f"{', '.join(map(str, SEEDS))} (`train.seed`: adapter init, dropout and data order).")


def _prunedlora_verdicts(rows: dict[str, dict]) -> list[str]:
    loss = "gsm8k_loss/loss"
    obs, r8, mag, r16 = "prunedlora obs (default)", "lora r8", "prunedlora magnitude", "lora r16"
    out = [paired(rows, obs, r8, loss, "PrunedLoRA 32 -> 8 (obs) at or below LoRA r8 in every seed (paper's claim)"),
           paired(rows, obs, mag, loss, "obs at or below magnitude on the same schedule, seed by seed")]
    means = {name: series_values(rows, name, loss) for name in (obs, mag)}
    if all(means.values()):
        m = {k: sum(v) / len(v) for k, v in means.items()}
        out.append(f"obs mean at or below magnitude's: {'yes' if m[obs] <= m[mag] else 'no'} "
                   f"({m[obs]:.4f} vs {m[mag]:.4f}).")
    # Paired, not the means: r16 may have fewer seeds than obs, and seeds move both alike.
    out.append(paired(rows, obs, r16, loss, "Stretch, level with LoRA r16 while deploying rank 8 (at or below it)"))
    return out


# ------------------------------------------------------------------------------------------------ suites
def _methods_setup(budget: str) -> str:
    return (f"Every run: SmolLM2-135M-Instruct, GSM8K train, the same seed, steps, batch and tokens, adapters on "
            f"all seven projections, bf16 autocast. Overrides shared by every run: {_budget_text('gsm8k', budget)}. "
            "Held-out loss = mean answer-token NLL on the first GSM8K test examples (the training format); exact "
            "match 0-shot, greedy; perplexities on the first windows of 512 tokens; MMLU 0-shot, one question "
            "per subject at limit 57. Small subsets: differences below the stderr in `eval/results.json` are "
            "noise. Peak memory is the process's peak resident set (CPU) or the CUDA peak (GPU).")


def _methods_verdicts(rows: dict[str, dict]) -> list[str]:
    loss, ppl = "gsm8k_loss/loss", "wikitext2/ppl"
    return [
        compare(rows, "prunedlora-s0.75", "lora-r8", loss,
                 "PrunedLoRA (r0 = 32 pruned to 8) beats LoRA trained at r = 8 on held-out loss (paper: beats "
                 "LoRA at equal final rank, Llama-3-8B on GSM8K/HumanEval; no numeric tables available)"),
        compare(rows, "prunedlora-s0.75", "adalora-s0.75", loss,
                 "PrunedLoRA beats AdaLoRA at the same r0 and final rank (paper: yes)"),
        compare(rows, "droplora-r8-p0.5", "lora-r8", loss,
                 "DropLoRA beats LoRA at the same rank (paper: consistently, LLaMA-2-7B / LLaMA-3-8B)"),
        compare(rows, "salr-s0.50", "lora-r8", loss,
                 "SALR at 50% base sparsity matches or beats dense LoRA (paper: matches or slightly exceeds it "
                 "on GSM8K and MMLU at 7B/8B)"),
        compare(rows, "salr-s0.50", "loraprune-s0.50", ppl,
                 "Unstructured pruning (SALR) keeps perplexity closer to dense than structured pruning (LoRAPrune, "
                 "whole heads and channels) at the same 50% (expected)"),
    ]


def _sweep_setup(budget: str) -> str:
    return (_methods_setup(budget) + " Sparsity means what each method prunes: PrunedLoRA the adapter's rank "
            "(r0 = 32 to 32 (1 - s): 24, 16, 8), LoRAPrune the heads and MLP channels of the base, SALR the base "
            "weights. So PrunedLoRA's points end at ranks above LoRA's 8 except at 0.75, and its base is never "
            "pruned; LoRAPrune's and SALR's are comparable with each other.")


def _sweep_verdicts(rows: dict[str, dict]) -> list[str]:
    out = []
    for method in ("prunedlora", "loraprune", "salr"):
        values = [value(rows, f"{method}-s{s:.2f}", "gsm8k_loss/loss") for s in (0.25, 0.5, 0.75)]
        if None in values:
            out.append(f"{method}: incomplete sweep.")
            continue
        monotone = values[0] <= values[1] <= values[2]
        out.append(f"{method}: held-out loss {'rises monotonically' if monotone else 'is not monotone'} with "
                   f"sparsity ({', '.join(f'{v:.4g}' for v in values)} at 0.25/0.5/0.75).")
    out.append("SALR paper: GSM8K accuracy holds up to 50% sparsity, 30% slightly better than dense "
               "(regularisation); PrunedLoRA paper: the more is pruned from a larger r0, the better (best at "
               "r0 = 512 to 64), which a sweep over the final rank at fixed r0 does not test.")
    return out


def _quality_setup(budget: str) -> str:
    return (f"SmolLM2-135M-Instruct fine-tuned on the PTB train split (the mirror has no raw WikiText-2 train "
            f"split), then token perplexity on the first windows of 512 tokens of the WikiText-2 and PTB test "
            f"splits. `base` is the model with no fine-tuning; `lora-r8` the dense LoRA fine-tune with the same "
            f"adapter as LoRAPrune (r = 8, all seven projections). 50% = half the heads and MLP channels of every "
            f"prunable layer (first 3 and last layer exempt), or half the weights of every linear (SALR). "
            f"Overrides shared by every run: {_budget_text('ptb', budget)}.")


def _structure_setup(budget: str) -> str:
    return (f"The quality suite's budget and evaluation (PTB fine-tune, WikiText-2 and PTB test windows of 512 "
            f"tokens), LoRAPrune's default criterion (`channel_taylor`) and progressive schedule. `per_layer` prunes "
            f"the prunable layers (first 3 and last exempt), each to its own shape; `uniform` prunes every layer to "
            f"the same shape, with per-layer counts chosen so the exported parameter count matches `per_layer`'s "
            f"(the \"achieved\" sparsity is lower because every layer shares it). Overrides shared by every run: "
            f"{_budget_text('ptb', budget)}.")


def _recovery_setup(budget: str) -> str:
    return (f"The quality suite's budget and evaluation. Around one default (LoRAPrune one-shot: cut, re-fit and "
            f"compact before the first step, `activation` scores, one query head removed per KV group "
            f"(`gqa_balanced=true`), `recovery=mix`, `per_layer`) each row changes one "
            f"factor; rows named `channel_taylor-s0.50` are LoRAPrune's default before this grid (progressive, no "
            f"re-fit, cross-entropy). SALR and PrunedLoRA rows run with each objective. The objective is the "
            f"`objective` column (ce: cross-entropy; distill: KL to the unpruned model; mix: the even mix). "
            f"Overrides shared by every run: {_budget_text('ptb', budget)}.")


def _quality_verdicts(rows: dict[str, dict]) -> list[str]:
    out = []
    # LLM-Pruner's score is the true weight gradient's first-order term, our `true_gradient` inside the same
    # schedule; the paper's LLM-Pruner baseline also differs in its pruning and tuning protocol.
    for key, paper in (("wikitext2/ppl", "11.60 vs 16.41"), ("ptb/ppl", "17.39 vs 20.85")):
        out.append(compare(rows, "loraprune-s0.50", "loraprune-true_gradient-s0.50", key,
                            f"LoRA-guided criterion beats the true gradient (LLM-Pruner) at 50% (paper: {paper})"))
    out.append(compare(rows, SALR_DEFAULT, "loraprune-s0.50", "wikitext2/ppl",
                        "Unstructured 50% (SALR) keeps perplexity closer to dense than structured 50% (LoRAPrune)"))
    # Issue 12's targets: fine-tuning must add to the best one-shot base; channel_taylor at least as good as
    # lora_guided; the stretch, SALR within 1.5x of dense LoRA's perplexity.
    for key in ("wikitext2/ppl", "ptb/ppl"):
        out.append(compare(rows, SALR_DEFAULT, "oneshot-wanda-s0.50", key,
                            "SALR's default at 50% ends below training-free Wanda (target)"))
        out.append(compare(rows, "loraprune-channel_taylor-s0.50", "loraprune-s0.50", key,
                            "channel_taylor ends below lora_guided (target: at or below)"))
        default, lora = value(rows, SALR_DEFAULT, key), value(rows, "lora-r8", key)
        out.append("Stretch, SALR's default within 1.5x of dense LoRA: " + (
            f"{'yes' if default <= 1.5 * lora else 'no'} ({default:.4g} vs {lora:.4g}: {default / lora:.2f}x, {key})."
            if default is not None and lora is not None else f"not measured ({key} missing)."))
    for key in ("wikitext2/ppl", "ptb/ppl"):  # the first target again under the 2:4 pattern; our own check
        out.append(compare(rows, SALR_DEFAULT_2OF4, "oneshot-wanda-2of4-s0.50", key,
                            "2:4: SALR's default ends below training-free 2:4 Wanda"))
        out.append(compare(rows, "loraprune-s0.50", "loraprune-magnitude-s0.50", key,
                            "LoRA-guided criterion beats magnitude at 50%"))
    return out


LORAPRUNE_PAPER = (
    "LoRAPrune paper, LLaMA-7B at 50% compression (Table 1 as quoted in docs/methods.md §5.5; different model, data "
    "and protocol, for reference only):\n\n"
    "| method | WikiText-2 PPL | PTB PPL | memory | mean zero-shot acc. |\n|---|---:|---:|---:|---:|\n"
    "| LLM-Pruner | 16.41 | 20.85 | 38.6 GB | 51.90% |\n"
    "| LoRAPrune | 11.60 | 17.39 | 18.3 GB | 54.81% |\n"
    "| LoRAPrune-8bit | 11.65 | 17.41 | 13.8 GB | 54.55% |"
)

_COMPARE_METRICS = (("gsm8k_loss/loss", "GSM8K held-out loss"), ("gsm8k/exact_match_flexible", "GSM8K EM (flex)"),
                    ("gsm8k/exact_match_strict", "GSM8K EM (strict)"), ("wikitext2/ppl", "WikiText-2 PPL"),
                    ("ptb/ppl", "PTB PPL"), ("mmlu/acc", "MMLU acc"))

SUITES: dict[str, Suite] = {
    "methods": Suite(
        "methods", "All methods, one model, one budget",
        (LORA, DROPLORA, _prunedlora(0.75), ADALORA, _loraprune(0.5), _salr(0.5), BASE),
        "gsm8k", _COMPARE_METRICS, _methods_setup, _methods_verdicts,
        papers="The papers' own numbers: PrunedLoRA and DropLoRA publish no numeric tables we could obtain "
               "(qualitative claims only, docs/methods.md §3.6, §4.4); SALR's per-model numbers are not available "
               "(§6.5); LoRAPrune's are in the quality section below."),
    "sweep": Suite(
        "sweep", "Sparsity sweep",
        (LORA, *(_prunedlora(s) for s in (0.25, 0.5, 0.75)), *(_loraprune(s) for s in (0.25, 0.5, 0.75)),
         *(_salr(s) for s in (0.25, 0.5, 0.75))),
        "gsm8k", _COMPARE_METRICS[:1] + _COMPARE_METRICS[3:5], _sweep_setup, _sweep_verdicts,
        plot_metrics=(("gsm8k_loss/loss", "GSM8K held-out loss"), ("wikitext2/ppl", "WikiText-2 PPL")),
        eval_overrides=("eval.tasks=[gsm8k_loss,wikitext2,ptb]",)),
    "quality": Suite(
        "quality", "LoRAPrune and SALR at 50%: perplexity after a short fine-tune",
        (BASE, LORA, *(_one_shot(c) for c in ("magnitude", "wanda", "sparsegpt")),
         *(_salr_base(c) for c in ("sparsegpt", "wanda", "magnitude")), structure_runs()[0],
         _loraprune(0.5), _loraprune(0.5, "magnitude"), _loraprune(0.5, "true_gradient"),
         *(_salr_base(c, "2:4") for c in ("sparsegpt", "wanda", "magnitude")),
         *(_one_shot(c, "2:4") for c in ("magnitude", "wanda", "sparsegpt"))),
        "ptb", (("wikitext2/ppl", "WikiText-2 PPL"), ("ptb/ppl", "PTB PPL")), _quality_setup, _quality_verdicts,
        papers=LORAPRUNE_PAPER),
    "structure": Suite(
        "structure", "LoRAPrune per_layer against uniform at 50% and 25%, seeds 42 and 1", structure_runs(),
        "ptb", (("wikitext2/ppl", "WikiText-2 PPL"), ("ptb/ppl", "PTB PPL")), _structure_setup, structure_verdicts),
    "recovery": Suite(
        "recovery", "LoRAPrune's recovery: objective, criterion, re-fit, schedule and structure, one at a time",
        recovery_runs(), "ptb", (("wikitext2/ppl", "WikiText-2 PPL"), ("ptb/ppl", "PTB PPL")), _recovery_setup,
        recovery_verdicts),
    "prunedlora": Suite(
        "prunedlora", "PrunedLoRA 32 -> 8 against LoRA at ranks 8 and 16, seeds 42, 1, 2", _prunedlora_runs(),
        "gsm8k", (("gsm8k_loss/loss", "GSM8K held-out loss"), ("wikitext2/ppl", "WikiText-2 PPL")),
        _prunedlora_setup, _prunedlora_verdicts, eval_overrides=("eval.tasks=[gsm8k_loss,wikitext2]",),
        seeded=True),
}
