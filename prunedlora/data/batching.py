"""Tokenization with answer-only loss masks, packing, padding, and a resumable batch order.

The training recipe calls :func:`build_train_examples` once, then draws micro-batches from
:class:`ResumableBatches`, whose ``state_dict`` goes into every checkpoint so that a resumed run sees
exactly the batches the uninterrupted run would have seen, mid-epoch included.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

from prunedlora.config import DataConfig, TaskConfig
from prunedlora.data.datasets import LM_JOINERS, load_records
from prunedlora.data.formatting import format_example
from prunedlora.data.sources import DataError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100  # label value PyTorch's cross-entropy (and HF's causal-LM loss) skips
Example = dict[str, list[int]]


def _encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # No special tokens here: BOS/EOS are placed explicitly so that the prompt/target boundary is exact.
    # verbose=False silences the "longer than model_max_length" warning; truncation happens below.
    return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []


def bos_prefix(tokenizer: Any) -> list[int]:
    """``[bos_token_id]`` when the tokenizer has a BOS token *and* adds it by itself, else ``[]``.

    LLaMA-2/3 tokenizers add BOS; SmolLM2's does not, and then training must not invent one.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return [bos] if ids[:1] == [bos] else []


def pad_id_of(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else EOS (LLaMA tokenizers ship no pad token), else 0."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def tokenize_examples(
    pairs: list[tuple[str, str]],
    tokenizer: Any,
    seq_len: int,
    *,
    answer_only_loss: bool = True,
    add_eos: bool = True,
) -> list[dict[str, list[int]]]:
    """Tokenize (prompt, target) pairs into ``{"input_ids", "labels"}`` rows of at most ``seq_len``.

    Prompt and target are tokenized separately and concatenated, so the label mask starts exactly at
    the first target token: ``[BOS] + prompt + target + [EOS]``, labels ``-100`` on BOS and prompt.
    Examples whose target is entirely truncated away are skipped with a warning giving their count.

    Args:
        pairs: (prompt, target) strings, e.g. from :func:`~prunedlora.data.formatting.format_example`.
        tokenizer: A Hugging Face tokenizer.
        seq_len: Maximum row length (right truncation).
        answer_only_loss: Mask the prompt out of the loss; False trains on every token.
        add_eos: Append EOS (when the tokenizer has one) so the model learns to stop.

    Returns:
        One dict per surviving example.
    """
    prefix = bos_prefix(tokenizer)
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    prompts = _encode(tokenizer, [p for p, _ in pairs])
    targets = _encode(tokenizer, [t for _, t in pairs])
    out, skipped = [], 0
    for p_ids, t_ids in zip(prompts, targets, strict=True):
        head = prefix + p_ids
        tail = t_ids + eos
        ids = (head + tail)[:seq_len]
        labels = ([IGNORE_INDEX] * len(head) + tail if answer_only_loss else head + tail)[:seq_len]
        # Position 0 is never a prediction target (labels are shifted), so it cannot rescue an example.
        if all(label == IGNORE_INDEX for label in labels[1:]):
            skipped += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    if skipped:
        log.warning("%d of %d examples skipped: their answer was truncated away at seq_len=%d (raise train.seq_len "
                    "to keep them)", skipped, len(pairs), seq_len)
    return out


def pack_examples(examples: list[dict], seq_len: int) -> list[dict]:
    """Concatenate examples into rows of exactly ``seq_len`` tokens, dropping the incomplete tail.

    Labels travel with their tokens, so prompt masking survives packing. Rows with no supervised
    token left are dropped: they cost compute and, alone in a batch, would make the loss NaN.
    """
    ids = [t for ex in examples for t in ex["input_ids"]]
    labels = [t for ex in examples for t in ex["labels"]]
    rows = []
    for start in range(0, len(ids) - seq_len + 1, seq_len):
        row_labels = labels[start:start + seq_len]
        if any(label != IGNORE_INDEX for label in row_labels[1:]):
            rows.append({"input_ids": ids[start:start + seq_len], "labels": row_labels})
    return rows


def collate(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of examples to the longest one.

    Returns:
        ``input_ids`` (pads = ``pad_id``), ``labels`` (pads = -100) and ``attention_mask`` (pads = 0),
        all ``torch.long`` of shape ``(batch, longest)``.
    """
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[i, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class ResumableBatches:
    """Endless, seeded, resumable stream of padded micro-batches over ``examples``.

    Epoch ``e`` visits the examples in the order ``torch.randperm(n, generator=manual_seed(seed + e))``,
    so the order depends only on (seed, epoch) and is recomputed, not stored, on resume.
    """

    def __init__(
        self, examples: list[dict], batch_size: int, seed: int, pad_id: int | None, drop_last: bool = True
    ) -> None:
        n = len(examples)
        if batch_size < 1 or n == 0 or (drop_last and n < batch_size):
            raise DataError(
                f"{n} training example(s) cannot fill one batch of train.batch_size={batch_size}. Lower "
                "train.batch_size, raise task.max_samples (or set it to null), or raise train.seq_len if "
                "examples were skipped for truncation."
            )
        # LLaMA tokenizers have no pad token (pad_token_id None). Any valid id will do: pads are masked out of
        # attention and loss, so 0 is used rather than failing.
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pad_id = 0 if pad_id is None else int(pad_id)
        self.drop_last = drop_last
        self.epoch, self.position = 0, 0
        self._order: tuple[int, list[int]] | None = None  # (epoch, permutation) cache

    def __len__(self) -> int:
        """Batches per epoch."""
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> ResumableBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.next_batch()

    def _permutation(self) -> list[int]:
        if self._order is None or self._order[0] != self.epoch:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = (self.epoch, torch.randperm(len(self.examples), generator=gen).tolist())
        return self._order[1]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """The next collated batch; rolls over into the next epoch (a new permutation) when one ends."""
        start = self.position * self.batch_size
        indices = self._permutation()[start:start + self.batch_size]
        self.position += 1
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        return collate([self.examples[i] for i in indices], self.pad_id)

    def state_dict(self) -> dict[str, int]:
        """Where the stream stands: ``epoch``, ``position`` (batches already drawn this epoch), ``seed``.

        ``num_examples`` and ``batch_size`` ride along so that resuming on different data is caught.
        """
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_examples": len(self.examples), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue exactly where ``state`` was taken (the next batch is the one that would have followed).

        Raises:
            DataError: The state was saved over a different number of examples or batch size.
        """
        for key, mine in (("num_examples", len(self.examples)), ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise DataError(
                    f"Cannot resume the data order: the checkpoint was taken with {key}={state[key]}, this run "
                    f"has {mine}. Resume with the same task.max_samples, train.seq_len, train.packing and "
                    "train.batch_size, or start a fresh run directory."
                )
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        if self.position >= len(self):
            raise DataError(f"Data state position={self.position} is past the {len(self)} batches of an epoch; "
                            "the checkpoint does not belong to this data. Start a fresh run directory.")
        self._order = None

    @staticmethod
    def num_tokens(batch: dict[str, torch.Tensor]) -> int:
        """Non-pad tokens in a collated batch (for tokens/s)."""
        return int(batch["attention_mask"].sum())


class ShardedBatches:
    """Rank ``rank`` of ``world`` takes every ``world``-th batch of one global, seeded order.

    The position saved in checkpoints is the global one, so a resumed job (with the same world size)
    continues exactly where every rank stopped.
    """

    def __init__(self, batches: ResumableBatches, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def next_batch(self) -> dict[str, torch.Tensor]:
        group = [self.batches.next_batch() for _ in range(self.world)]
        return group[self.rank]

    def state_dict(self) -> dict[str, Any]:
        return {**self.batches.state_dict(), "world": self.world}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("world", self.world) != self.world:
            raise RuntimeError(f"checkpoint was written with {state['world']} ranks; resume with the same number")
        self.batches.load_state_dict({k: v for k, v in state.items() if k != "world"})


def _text_chunks(task: TaskConfig, records: list[dict], tokenizer: Any, seq_len: int) -> list[Example]:
    """Plain LM rows: the corpus joined as for evaluation, tokenized once, cut into full ``seq_len`` rows."""
    if task.dataset in LM_JOINERS:
        text = LM_JOINERS[task.dataset](records)
    else:
        text = "\n\n".join(p + t for p, t in (format_example(task.dataset, r) for r in records))
    ids = tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
    return [{"input_ids": ids[i:i + seq_len], "labels": list(ids[i:i + seq_len])}
            for i in range(0, len(ids) - seq_len + 1, seq_len)]


def build_train_examples(
    task: TaskConfig, data: DataConfig, tokenizer: Any, seq_len: int, seed: int, packing: bool
) -> list[dict]:
    """Everything from ``task`` to tokenized training rows (the one entry point of the training recipe).

    ``qa``/``mc``/``code``: load, seeded shuffle, cap at ``task.max_samples``, format, tokenize with the
    loss on the answer only, optionally pack. ``text``: the corpus joined as for perplexity evaluation,
    tokenized once and cut into ``seq_len`` rows; the seeded shuffle and the cap then apply to those
    rows, because shuffling lines before joining would scramble the documents.

    Args:
        task: Dataset, split, explicit path, kind and ``max_samples``.
        data: Mirror root and hub switch.
        tokenizer: The model's tokenizer.
        seq_len: ``train.seq_len``.
        seed: ``train.seed`` (shuffle before the cap).
        packing: ``train.packing``: full ``seq_len`` rows instead of one example per row.

    Returns:
        ``{"input_ids", "labels"}`` rows.

    Raises:
        DataError: Data not found or malformed, or no example survives truncation.
    """
    records = load_records(task.dataset, task.split, data, task.path)
    if task.kind == "text":
        examples = _text_chunks(task, records, tokenizer, seq_len)
        random.Random(seed).shuffle(examples)
        examples = examples[: task.max_samples] if task.max_samples is not None else examples
    else:
        order = list(range(len(records)))
        random.Random(seed).shuffle(order)
        order = order[: task.max_samples] if task.max_samples is not None else order
        pairs = [format_example(task.dataset, records[i]) for i in order]
        examples = tokenize_examples(pairs, tokenizer, seq_len, answer_only_loss=True)
        examples = pack_examples(examples, seq_len) if packing else examples
    if not examples:
        raise DataError(_why_no_examples(task, len(records), seq_len, packing))
    return examples


def _why_no_examples(task: TaskConfig, n_records: int, seq_len: int, packing: bool) -> str:
    """The reason every record was filtered out, in the user's terms (the data itself is not empty)."""
    source = f"task {task.name!r} ({task.dataset} {task.split}, {n_records} records)"
    if task.max_samples is not None and task.max_samples < 1:
        return f"task.max_samples={task.max_samples} keeps none of the {n_records} records of {source}; set it >= 1."
    if task.kind == "text":
        return (f"All {n_records} records of {source} were filtered out: the joined text is shorter than one row of "
                f"train.seq_len={seq_len} tokens. Lower train.seq_len.")
    if packing:
        return (f"All {n_records} records of {source} were filtered out: packed together they do not fill one row of "
                f"train.seq_len={seq_len} tokens with an answer token in it. Lower train.seq_len, set "
                "train.packing=false, or raise task.max_samples.")
    return (f"All {n_records} records of {source} were filtered out because their answers were truncated away at "
            f"train.seq_len={seq_len}. Raise train.seq_len.")
