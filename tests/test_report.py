"""The sweep report: a fake two-run multirun directory, and one real tiny multirun (slow)."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

import pytest
import yaml

from prunedlora.eval import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(root: Path, num: int, method: str, sparsity: float, acc: float, ppl: float, ranks: dict) -> None:
    run = root / str(num)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"method={method}", f"sparsity.final={sparsity}"]))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"method": {"name": method},
                                                                "sparsity": {"final": sparsity}}))
    summary = {"method": method, "params_total": 1000, "params_trainable": 40, "params_after_export": 900,
               "ranks": ranks, "sparsity": sparsity * 0.98, "final_loss": 1.5,
               "eval": {"gsm8k": {"exact_match_strict": acc}}}
    (run / "summary.json").write_text(json.dumps(summary))
    steps = [{"step": 1, "tokens_per_s": 10.0, "peak_memory_mb": 100.0},  # warm-up step: not in the median
             {"step": 2, "tokens_per_s": 400.0 + num, "peak_memory_mb": 150.0},
             {"step": 3, "tokens_per_s": 600.0 + num, "peak_memory_mb": 180.0 + num}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in steps))
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"results": {
        "gsm8k": {"exact_match_strict": acc, "exact_match_flexible": acc + 0.1}, "humaneval": {"pass@1": 0.05},
        "wikitext2": {"ppl": ppl}}, "settings": {"gsm8k": {"n": 16}}}))
    (run / "eval" / "results.prev-20250101-000000.json").write_text("{}")  # an earlier evaluation: ignored


@pytest.fixture
def multirun(tmp_path: Path) -> Path:
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    _fake_run(root, 0, "lora", 0.2, 0.30, 12.0, {"q": 8, "v": 8})
    _fake_run(root, 1, "prunedlora", 0.5, 0.25, 13.5, {"q": 4, "v": 6})
    return root


def test_report_on_a_two_run_multirun(multirun: Path):
    written = report.write_report(multirun)
    rows = written["rows"]
    assert [r["run"] for r in rows] == ["0", "1"] and [r["method"] for r in rows] == ["lora", "prunedlora"]
    assert rows[1]["sparsity"] == 0.5 and rows[1]["sparsity_achieved"] == pytest.approx(0.49)
    assert rows[0]["ranks"] == "8" and rows[1]["ranks"] == "mean 5 (4-6)" and rows[1]["rank_mean"] == 5.0
    assert rows[1]["overrides"] == "method=prunedlora sparsity.final=0.5"
    assert rows[1]["tokens_per_s"] == 501.0 and rows[1]["peak_memory_mb"] == 181.0  # median after step 1; peak
    with open(written["csv"], newline="") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 2 and table[1]["gsm8k/exact_match_strict"] == "0.25"
    assert {"run", "method", "sparsity", "ranks", "params_total", "params_trainable", "params_after_export",
            "gsm8k/exact_match_flexible", "humaneval/pass@1", "wikitext2/ppl"} <= set(table[0])
    md = (multirun / "report" / "report.md").read_text()
    assert "| run | method | objective | sparsity |" in md and "| 1 | prunedlora | ce | 0.5 |" in md
    assert md.count("\n| ") == 3
    assert table[1]["gsm8k/n"] == "16" and "gsm8k/n" not in md  # items per run: in the CSV, on the plots' axes
    names = sorted(p.name for p in written["plots"])
    assert names == ["gsm8k_exact_match_flexible.png", "gsm8k_exact_match_strict.png", "humaneval_pass_at_1.png",
                     "wikitext2_ppl.png"]
    assert all(p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 5000 for p in written["plots"])
    # a second report regenerates the same files and does not pick up its own output as a run
    assert len(report.write_report(multirun)["rows"]) == 2


def _row(method: str, target: float, achieved: float | None, seed: int, value: float) -> dict:
    """A report row of a finished run (``params_total`` set: it has a summary)."""
    return {"method": method, "sparsity": target, "sparsity_achieved": achieved, "seed": seed, "params_total": 10,
            "m": value}


def test_points_sit_at_the_reached_sparsity_with_seed_error_bars():
    """The sweep of issue 14: both prunedlora targets ended at 0.125; lora prunes nothing; two seeds per target."""
    rows = [_row("prunedlora", 0.25, 0.125, 42, 1.0), _row("prunedlora", 0.25, 0.125, 1, 3.0),
            _row("prunedlora", 0.5, 0.125, 42, 5.0), _row("salr", 0.5, 0.5, 42, 7.0),
            _row("lora", 0.25, None, 42, 2.0), _row("lora", 0.5, None, 42, 2.0),  # one seed swept over targets
            {"method": "salr", "sparsity": 0.5, "m": 9.0}]  # no summary, no reached sparsity: not placed
    got = report.points(rows, "m")
    assert set(got) == {"prunedlora", "salr", "lora"}
    short25, short50 = got["prunedlora"]
    assert (short25.x, short25.target, short25.reached, short25.runs) == (0.125, 0.25, False, 2)
    assert short25.y == 2.0 and short25.err == pytest.approx(2 ** 0.5)  # mean and sample s.d. of 1 and 3
    assert (short50.target, short50.reached, short50.err) == (0.5, False, None)
    assert [(p.x, p.reached) for p in got["salr"]] == [(0.5, True)]
    (dense,) = got["lora"]  # prunes nothing: x = 0, no target, the same seed twice is one sample
    assert (dense.x, dense.target, dense.reached, dense.runs, dense.err) == (0.0, None, True, 1, None)


def test_titles_say_which_direction_is_better_and_all_zero_metrics_get_no_plot(tmp_path: Path):
    assert report.direction("wikitext2/ppl") == "lower is better"
    assert report.direction("gsm8k_loss/loss") == "lower is better"
    assert report.direction("gsm8k/exact_match_strict") == "higher is better"
    assert report.direction("humaneval/pass@1") == "higher is better"
    zeros = [_row("lora", 0.5, None, 42, 0.0), _row("prunedlora", 0.5, 0.25, 42, 0.0)]
    assert report.plot_metric(zeros, "m", tmp_path / "zeros.png") is None and not (tmp_path / "zeros.png").exists()
    some = [*zeros, _row("prunedlora", 0.75, 0.5, 42, 0.125)]
    assert report.plot_metric(some, "m", tmp_path / "some.png").read_bytes().startswith(PNG_MAGIC)


def test_report_cli(multirun: Path, tmp_path: Path, capsys):
    assert report.main([str(multirun), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "| 0 | lora | ce | 0.2 |" in out and "2 runs" in out
    assert (tmp_path / "out" / "report.csv").is_file() and (tmp_path / "out" / "wikitext2_ppl.png").is_file()
    assert report.main([str(tmp_path / "empty_does_not_exist")]) == 2
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.slow
def test_report_on_a_real_tiny_multirun(tmp_path: Path, data_root: Path):
    """``prunedlora-train -m`` over two methods and two sparsities, then ``prunedlora-report`` on it."""
    from cli_helpers import BIN, cli_env

    sweep = tmp_path / "sweep"
    args = [str(BIN / "prunedlora-train"), "-m", "model=tiny", "task=gsm8k", "method=lora,prunedlora",
            "sparsity.final=0.25,0.5", "train.max_steps=2", "train.batch_size=2",
            "train.seq_len=256", "task.max_samples=16", "eval.tasks=[ptb]", "eval.limit=2", "eval.seqlen=64",
            "logging.progress=false", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(args, env=cli_env(data_root), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([str(BIN / "prunedlora-report"), str(sweep)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(open(sweep / "report" / "report.csv", newline="")))
    assert sorted((r["method"], float(r["sparsity"])) for r in rows) == [
        ("lora", 0.25), ("lora", 0.5), ("prunedlora", 0.25), ("prunedlora", 0.5)]
    assert all(float(r["ptb/ppl"]) > 1 for r in rows)
    assert (sweep / "report" / "ptb_ppl.png").read_bytes().startswith(PNG_MAGIC)


def test_standalone_evals_filed_under_a_run_fill_its_row(multirun: Path):
    """``prunedlora-eval run_dir=<run>`` writes <run>/evals/<time>/eval/: its new tasks join the run's row (the run's
    own evaluation wins for tasks both have), and it is not a run of its own."""
    later = multirun / "1" / "evals" / "2026-01-02_00-00-00-000000" / "eval"
    later.mkdir(parents=True)
    (later / "results.json").write_text(json.dumps({
        "results": {"mmlu": {"acc": 0.31}, "wikitext2": {"ppl": 99.0}}, "settings": {"mmlu": {"n": 57}},
        "model": {"run_dir": str(multirun / "1")}}))
    rows = report.collect(multirun)
    assert [r["run"] for r in rows] == ["0", "1"]
    assert rows[1]["mmlu/acc"] == 0.31 and rows[1]["mmlu/n"] == 57 and rows[1]["wikitext2/ppl"] == 13.5
    assert "mmlu/acc" not in rows[0]
