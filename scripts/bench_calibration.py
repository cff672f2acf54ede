"""Cost of SALR's activation-aware bases (issue 12: "stays under a minute for SmolLM2 on CPU").

Loads the model the way ``prunedlora-train`` does, cuts the calibration rows from the training data exactly as
``method=salr`` does (``method.calibration_sequences`` rows of ``train.seq_len`` tokens), then times each stage
in this process, in wall and CPU time: the dense calibration pass with Wanda's norms only, the pass with
SparseGPT's Gram matrices too, and pruning every target matrix with each criterion (50%, unstructured). CPU time
is the figure to read on a shared machine: wall time there measures the neighbours.

    python -m scripts.bench_calibration [--model smollm2_135m] [--task ptb] [--seq-len 256] [--threads 1]
        [--no-write]

Writes the ``calibration_cost`` section of ``docs/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from prunedlora.compose import compose_config
from prunedlora.data import build_train_examples
from prunedlora.methods.salr import target_linears
from prunedlora.models import load_model
from prunedlora.pruning.base_criteria import pruned_weights
from prunedlora.pruning.calibration import calibration_rows, collect_input_stats
from scripts._publish import provenance, publish


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """``fn()``, its wall seconds and this process's CPU seconds."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2_135m")
    parser.add_argument("--task", default="ptb", help="training data the calibration rows come from")
    parser.add_argument("--seq-len", type=int, default=256, help="train.seq_len (the quality suite's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = compose_config([f"model={args.model}", f"task={args.task}", "method=salr", f"train.seq_len={args.seq_len}"])
    model, tokenizer = load_model(cfg.model, torch.device("cpu"))
    model.eval()
    examples = build_train_examples(cfg.task, cfg.data, tokenizer, cfg.train.seq_len, cfg.train.seed,
                                    cfg.train.packing)
    rows = calibration_rows(examples, cfg.method.calibration_sequences, cfg.train.seq_len)
    targets = target_linears(model, cfg.method.target_modules)

    def prune_all(criterion: str, stats: dict) -> None:
        for _ in pruned_weights(targets, criterion, 0.5, "per_matrix", "unstructured", stats):
            pass

    stats_norms, *norms_cost = timed(lambda: collect_input_stats(model, targets, rows, gram=False))
    stats_gram, *gram_cost = timed(lambda: collect_input_stats(model, targets, rows, gram=True))
    _, *wanda_cost = timed(lambda: prune_all("wanda", stats_norms))
    _, *sparsegpt_cost = timed(lambda: prune_all("sparsegpt", stats_gram))
    _, *magnitude_cost = timed(lambda: prune_all("magnitude", None))
    rows_md = [
        ("calibration pass, norms (wanda)", norms_cost), ("calibration pass, norms + Gram (sparsegpt)", gram_cost),
        ("prune, magnitude", magnitude_cost), ("prune, wanda", wanda_cost), ("prune, sparsegpt", sparsegpt_cost),
    ]
    total = {"wanda": norms_cost[1] + wanda_cost[1], "sparsegpt": gram_cost[1] + sparsegpt_cost[1]}
    markdown = "\n".join([
        "## SALR base criteria: calibration and pruning cost",
        "",
        f"`model={args.model}`, {len(targets)} target linears, calibration on {rows.shape[0]} x {rows.shape[1]} "
        f"tokens of `task={args.task}` (the quality suite's), 50% unstructured, {args.threads} thread(s), float32.",
        "",
        "| stage | wall (s) | CPU (s) |",
        "|---|---:|---:|",
        *(f"| {name} | {wall:.1f} | {cpu:.1f} |" for name, (wall, cpu) in rows_md),
        "",
        f"In all, CPU time: wanda {total['wanda']:.0f} s, sparsegpt {total['sparsegpt']:.0f} s.",
        "",
        *provenance(),
    ])
    publish("calibration_cost", markdown, write=not args.no_write)


if __name__ == "__main__":
    main()
