"""Model-level rows of ``scripts/bench_salr.py``: batch-1 greedy ``generate`` from SALR's compressed form.

For a salr export (``compressed/``), at each thread count, every path generates ``new_tokens`` tokens (greedy,
KV cache on, a short prompt) from one model loaded per path with ``load_salr_export``:

- ``dense model``: the pruned base as a plain dense model without adapters (the ``base_format=dense`` model with
  its ``SalrLinear`` wrappers swapped out by ``plain_bases``: same tensors, no second copy), what a user of the
  dense checkpoint runs;
- ``compressed, dense`` / ``auto`` / ``fused``: ``load_salr_export(base_format=...)``, each with the fused adapter;
  ``compressed, dense`` is the trained model stored dense (``model/`` + ``adapter/``), the same function as the
  compressed paths, so its ratio says what the kernel buys; the ``dense model`` ratio adds what the adapter costs;
- ``compressed, fused, no adapter``: the fused model with its ``SalrLinear`` wrappers swapped out (the kernel
  alone, against the dense model);
- ``compressed, bitmap``: the reference that decodes every matrix in every forward, far slower, so it runs
  ``ref_tokens`` tokens once, at one thread.

The paths run interleaved (one generate each per round, the order rotating), ``repeats`` rounds. Each generate
records the clocks at every new token (a logits processor), so the decode rate excludes the prompt:
``(new_tokens - 1) / (t_last - t_first)``. At one thread both the wall clock and the calling thread's CPU time
(``time.thread_time``: time the OS gives other processes on a shared machine does not count) are reported; at
more threads the wall clock. Ratios are medians of per-round ratios against the dense model.

Bytes per token: every parameter a step reads (the embedding table counts one row: none; a tied ``lm_head``
counts in full), in the form the path stores it; the bitmap reference also writes and reads each decoded matrix.
``time_split`` times one generate per path with forward hooks (pruned base linears, the adapter branch,
``lm_head``, the rest: attention, norms, the KV cache, Python and ``generate``'s own work).
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from prunedlora.adapters.salr import salr_modules
from prunedlora.export.compressed import base_formats, load_salr_export
from prunedlora.methods.salr.export import plain_bases
from prunedlora.models.surgery import replace_module
from prunedlora.pruning.bitmap import BitmapLinear
from prunedlora.pruning.fused_bitmap import clear_auto_cache

SPLIT_TOKENS = 16  # new tokens of the time split
PROMPT = "Question: Tom has 3 apples and buys 2 more. How many apples does he have?"


class StepClock(LogitsProcessor):
    """Records the wall and thread CPU clocks each time ``generate`` scores a new token (after its forward)."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.thread_time())
        return scores


@dataclass
class Sample:
    """One generate: the new tokens, seconds per decode step (wall, thread CPU) and the whole call's wall time."""

    tokens: list[int]
    step_wall: float
    step_cpu: float
    total_wall: float


def generate(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> Sample:
    """Greedy ``new_tokens`` tokens with the KV cache, timed per step."""
    clock = StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             use_cache=True, pad_token_id=0, logits_processor=LogitsProcessorList([clock]))
    total = time.perf_counter() - start
    steps = max(1, len(clock.wall) - 1)
    return Sample(out[0, prompt.shape[1]:].tolist(), (clock.wall[-1] - clock.wall[0]) / steps,
                  (clock.cpu[-1] - clock.cpu[0]) / steps, total)


def bytes_per_token(model: nn.Module) -> int:
    """Bytes of the parameters one decode step reads (see the module docstring)."""
    total = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if ".embed_tokens." not in name:
            total += p.numel() * p.element_size()
    for module in model.modules():
        if isinstance(module, BitmapLinear):  # the decoded matrix is written, then read by the GEMM
            total += 2 * module.out_features * module.in_features * module.values.element_size()
    return total


@dataclass
class Path_:
    """One way of running the export: the model and the context it runs in (``plain_bases`` for the dense model)."""

    model: nn.Module
    context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    load_s: float = 0.0
    samples: list[Sample] = field(default_factory=list)


@contextlib.contextmanager
def bare_bases(model: nn.Module) -> Iterator[None]:
    """Within the block, each ``SalrLinear`` of ``model`` is replaced by its base (the adapters left out)."""
    wrappers = salr_modules(model)
    for name, wrapper in wrappers.items():
        replace_module(model, name, wrapper.base_layer)
    try:
        yield
    finally:
        for name, wrapper in wrappers.items():
            replace_module(model, name, wrapper)


def load_paths(compressed: Path, dense: tuple[nn.Module, float] | None) -> dict[str, Path_]:
    """The four interleaved paths. ``dense`` (model, load seconds) is reused across thread counts; ``auto`` is
    loaded anew, its choice depending on the thread count."""
    clear_auto_cache()
    if dense is None:
        start = time.perf_counter()
        dense = load_salr_export(compressed, "dense"), time.perf_counter() - start
    model, seconds = dense
    paths = {"dense model": Path_(model, lambda: plain_bases(model), seconds),
             "compressed, dense": Path_(model, load_s=seconds)}
    for fmt in ("auto", "fused"):
        start = time.perf_counter()
        paths[f"compressed, {fmt}"] = Path_(load_salr_export(compressed, fmt), load_s=time.perf_counter() - start)
    fused = paths["compressed, fused"]
    paths["compressed, fused, no adapter"] = Path_(fused.model, lambda: bare_bases(fused.model), fused.load_s)
    return paths


def run_interleaved(paths: dict[str, Path_], prompt: torch.Tensor, new_tokens: int, repeats: int) -> None:
    """``repeats`` rounds of one generate per path, the order rotating; fills each path's ``samples``."""
    names = list(paths)
    for name in names:  # warm-up: first-touch pages, the kernel's threads, generate's caches
        with paths[name].context():
            generate(paths[name].model, prompt, 4)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            with paths[name].context():
                paths[name].samples.append(generate(paths[name].model, prompt, new_tokens))


def _median_ratio(num: list[float], den: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(num, den, strict=True))


def _ratios(path: Path_, base: Path_, one_thread: bool) -> str:
    """``wall / CPU`` speed of ``path`` against ``base``: medians of per-round ratios (CPU only at one thread)."""
    wall = _median_ratio([s.step_wall for s in base.samples], [s.step_wall for s in path.samples])
    if not one_thread:
        return f"{wall:.2f}x / n/a"
    return f"{wall:.2f}x / {_median_ratio([s.step_cpu for s in base.samples], [s.step_cpu for s in path.samples]):.2f}x"


def _row(label: str, threads: int, name: str, path: Path_, bases: tuple[Path_, Path_], mb: float, same: str) -> str:
    one = threads == 1
    wall = statistics.median(s.step_wall for s in path.samples)
    cpu = statistics.median(s.step_cpu for s in path.samples)
    total = statistics.median(s.total_wall for s in path.samples)
    return (f"| {label} | {threads} | {name} | {mb:,.1f} | {1 / wall:.2f} | {f'{1 / cpu:.2f}' if one else 'n/a'} | "
            f"{_ratios(path, bases[0], one)} | {_ratios(path, bases[1], one)} | {total:.2f} | "
            f"{mb / 1e3 / (cpu if one else wall):.1f} | {path.load_s:.1f} | {same} |")


HEADER = ("| model | threads | path | MB read / token | decode tok/s (wall) | decode tok/s (thread CPU) | "
          "vs dense model (wall / CPU) | vs same model stored dense (wall / CPU) | generate (s, wall) | GB/s | "
          "load (s) | same tokens |\n|---|---|---|---|---|---|---|---|---|---|---|---|")


def model_rows(label: str, compressed: Path, prompt: torch.Tensor, threads_list: list[int], new_tokens: int,
               repeats: int, ref_tokens: int) -> tuple[list[str], dict[str, dict[str, float]], dict[int, str]]:
    """One export at every thread count: the table rows, the time split of each path at one thread, and what
    ``auto`` kept at each thread count."""
    rows, split, kept, dense = [], {}, {}, None
    for threads in threads_list:
        torch.set_num_threads(threads)
        paths = load_paths(compressed, dense)
        dense = paths["compressed, dense"].model, paths["compressed, dense"].load_s
        kept[threads] = ", ".join(f"{k} {v}" for k, v in sorted(base_formats(paths["compressed, auto"].model).items()))
        run_interleaved(paths, prompt, new_tokens, repeats)
        bases = paths["dense model"], paths["compressed, dense"]
        want = paths["compressed, dense"].samples[0].tokens
        for name, path in paths.items():
            with path.context():
                mb = bytes_per_token(path.model) / 1e6
            same = "n/a (no adapter)" if "dense model" in name or "no adapter" in name else \
                ("yes" if all(s.tokens == want for s in path.samples) else "NO")
            rows.append(_row(label, threads, name, path, bases, mb, same))
            print(rows[-1], flush=True)
        if threads == 1:
            split = {name: time_split(path, prompt, min(new_tokens, SPLIT_TOKENS)) for name, path in paths.items()}
            rows.append(reference_row(label, compressed, prompt, ref_tokens, bases, want))
            print(rows[-1], flush=True)
        del paths
        gc.collect()
    return rows, split, kept


def reference_row(label: str, compressed: Path, prompt: torch.Tensor, new_tokens: int, bases: tuple[Path_, Path_],
                  want: list[int]) -> str:
    """``base_format=bitmap`` (decode in every forward): one generate of ``new_tokens`` at one thread, against the
    first round of each base."""
    start = time.perf_counter()
    model = load_salr_export(compressed, "bitmap")
    path = Path_(model, load_s=time.perf_counter() - start)
    path.samples = [generate(model, prompt, new_tokens)]
    same = "yes" if path.samples[0].tokens == want[:new_tokens] else "NO"
    firsts = tuple(Path_(b.model, samples=b.samples[:1]) for b in bases)
    row = _row(label, 1, f"compressed, bitmap ({new_tokens} tokens, once)", path, firsts,
               bytes_per_token(model) / 1e6, same)
    del model, path
    gc.collect()
    return row


# ---------------------------------------------------------------------------------------- time split
@contextlib.contextmanager
def _split_hooks(model: nn.Module, totals: dict[str, float]) -> Iterator[None]:
    """Thread CPU seconds spent in the pruned bases, the adapter branch and ``lm_head`` on one-token inputs (the
    decode steps; the prompt's forward is left out), added to ``totals``."""
    handles, starts = [], {}

    def timer(key: str, module: nn.Module) -> None:
        def pre(_: nn.Module, args: tuple) -> None:
            if args[0].shape[-2] == 1:
                starts[id(module)] = time.thread_time()

        def post(*_: object) -> None:
            if id(module) in starts:
                totals[key] += time.thread_time() - starts.pop(id(module))

        handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    wrappers = salr_modules(model)
    for wrapper in wrappers.values():
        timer("base", wrapper.base_layer)
        timer("wrapper", wrapper)
    if not wrappers:  # the dense model or the bare bases: the pruned linears stand alone
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1].endswith("_proj") and hasattr(module, "in_features"):
                timer("base", module)
    timer("lm_head", model.get_output_embeddings())
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def time_split(path: Path_, prompt: torch.Tensor, new_tokens: int) -> dict[str, float]:
    """Milliseconds of thread CPU per decode step in each part (one thread; see the module docstring)."""
    totals = dict.fromkeys(("base", "wrapper", "lm_head"), 0.0)
    with path.context():
        generate(path.model, prompt, 2)  # warm-up, outside the totals
        with _split_hooks(path.model, totals):
            sample = generate(path.model, prompt, new_tokens)
    adapter = totals["wrapper"] - totals["base"] if totals["wrapper"] else 0.0
    steps = new_tokens - 1  # the one-token forwards, between the first and the last new token
    parts = {"pruned linears": totals["base"] / steps, "adapter branch": adapter / steps,
             "lm_head": totals["lm_head"] / steps}
    parts["rest"] = sample.step_cpu - sum(parts.values())
    return {k: 1e3 * v for k, v in parts.items()}


def split_table(splits: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown of ``{model: {path: {part: ms per token}}}``."""
    parts = ["pruned linears", "adapter branch", "lm_head", "rest"]
    lines = ["| model | path | " + " | ".join(f"{p} (ms/token)" for p in parts) + " | total (ms/token) |",
             "|---|---|" + "---|" * (len(parts) + 1)]
    for label, by_path in splits.items():
        for name, ms in by_path.items():
            lines.append(f"| {label} | {name} | " + " | ".join(f"{ms[p]:.1f}" for p in parts) +
                         f" | {sum(ms.values()):.1f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ the 7B-shaped stack
def build_stack(out_dir: Path, layers: int = 2) -> Path:
    """A LLaMA-7B-shaped stack (hidden 4096, MLP 11008, 32 heads, ``layers`` decoder layers, the byte tokenizer's
    259-token vocabulary), random weights (transformers' init), pruned 50% by magnitude per matrix by
    ``method=salr`` (residual rank 8, task rank 8) and exported as ``out_dir/compressed``; returns that folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunedlora.config import SparsityConfig
    from prunedlora.methods import build_method
    from prunedlora.methods.salr import SalrConfig
    from prunedlora.models import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    method = build_method(SalrConfig(residual_rank=8, rank=8, base_criterion="magnitude"), SparsityConfig(final=0.5))
    method.attach(model)
    method.export(model, tokenizer, out_dir, "llama7b-shaped", ("bitmap",))
    del model, method
    gc.collect()
    return out_dir / "compressed"
