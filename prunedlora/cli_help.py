"""``--help`` of ``prunedlora-train`` and ``prunedlora-eval``: what the command does, then the config groups.

Hydra's own help starts with "powered by Hydra" and lists every config group, internal schema groups
included. Ours opens with a paragraph and the most useful command lines, names the other commands, and
lists the user-facing groups with their options, read from the config tree itself, and the methods from their
registry (so neither list can drift from what composes). ``--hydra-help`` still prints Hydra's.
"""

from __future__ import annotations

from importlib.resources import files

from prunedlora.methods.registry import method_specs

INTERNAL_GROUPS = ("schema",)
"""Config folders that hold schemas or internals, not options a user picks."""

COMMANDS = {
    "prunedlora-train": "compose config -> load model -> attach method -> train -> export -> evaluate",
    "prunedlora-eval": "evaluate a finished run (run_dir=...) or any Hugging Face causal LM (model.name_or_path=...)",
    "prunedlora-report": "one CSV, one markdown table and one plot per metric for a sweep (prunedlora-report <dir>)",
}

ABOUT = {
    "prunedlora-train": (
        "Fine-tune a LLaMA-family causal LM with a LoRA-family method ({methods}), pruning while it trains; then "
        "export the adapter and the merged or pruned model, evaluate it (eval.limit items per task, 50 by default) "
        "and write summary.json, all into one run directory (outputs/<task>/<method>/<time>, or "
        "hydra.run.dir=<dir>). Re-running with the same hydra.run.dir resumes; Ctrl-C saves a checkpoint first. "
        "Settings are key=value overrides of the config groups below; -m sweeps comma-separated values.",
        [
            "prunedlora-train model=tiny method=lora task=gsm8k train.max_steps=3      # smoke run, seconds on CPU",
            "prunedlora-train method=prunedlora method.init_rank=32 sparsity.final=0.75 hydra.run.dir=runs/pl",
            "prunedlora-train -m method=lora,prunedlora sparsity.final=0.25,0.5 hydra.sweep.dir=sweeps/s1",
        ],
        ["model", "method", "sparsity", "recovery", "task", "train", "eval", "export", "data", "logging", "distributed",
         "experiment", "hydra/launcher"],
    ),
    "prunedlora-eval": (
        "Evaluate a model on eval.tasks (GSM8K, MMLU, HumanEval, WikiText-2 and PTB perplexity, held-out GSM8K "
        "loss) and write results.json and results.md, printing the path. Name what to evaluate: run_dir=<a "
        "prunedlora-train run> (its exported model, with that run's evaluation settings unless overridden; "
        "results go to <run dir>/evals/<time>) or model.name_or_path=<hub id or local dir> (results go to "
        "outputs/eval/<model name>/<time>). eval.limit items per task (50 by default; null: all).",
        [
            "prunedlora-eval run_dir=outputs/gsm8k/lora/2026-01-01_12-00-00-000000",
            "prunedlora-eval run_dir=runs/pl eval.tasks=[mmlu] eval.limit=570",
            "prunedlora-eval model=hf model.name_or_path=HuggingFaceTB/SmolLM2-135M-Instruct eval.tasks=[wikitext2]",
        ],
        ["model", "task", "eval", "data", "logging"],
    ),
}


def group_options() -> dict[str, list[str]]:
    """``group -> options`` from the packaged config tree (``configs/<group>/<option>.yaml``), nested groups as
    ``hydra/launcher``; internal groups left out."""
    root = files("prunedlora.configs")
    out: dict[str, list[str]] = {}

    def walk(node, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith(("_", ".")) and child.name not in INTERNAL_GROUPS:
                name = f"{prefix}{child.name}"
                options = sorted(c.name[:-5] for c in child.iterdir() if c.name.endswith(".yaml"))
                if options:
                    out[name] = options
                walk(child, name + "/")

    walk(root, "")
    return out


def help_text(prog: str) -> str:
    """The full ``--help`` text of ``prog`` (``prunedlora-train`` or ``prunedlora-eval``)."""
    about, examples, groups = ABOUT[prog]
    about = about.format(methods=", ".join(method_specs()))
    options = group_options()
    others = [f"  {name:<18} {what}" for name, what in COMMANDS.items() if name != prog]
    lines = [f"{prog}: {about}", "", "Examples:", *(f"  {e}" for e in examples), "", "Other commands:", *others, "",
             "Config groups (choose an option with group=option; set any key with group.key=value):"]
    for group in groups:
        if group in options:
            lines.append(f"  {group:<15} {', '.join(options[group])}")
    lines += ["", "Every key and its current value: --cfg job. Misspelt keys and bad values are reported before "
              "anything loads; debug=true shows tracebacks; logging.verbose=true keeps third-party messages. "
              "Hydra's own help: --hydra-help."]
    return "\n".join(lines)
