"""The HumanEval sandbox's Python layer: what passes, what fails, what times out, nothing runs without opt-in.

These run at ``sandbox="python"`` so that the guards are tested on their own; ``test_sandbox.py`` tests the
bubblewrap layer around them.
"""

from __future__ import annotations

import gzip
import json
import socket
import subprocess
from pathlib import Path

import pytest

from prunedlora.eval import humaneval
from prunedlora.eval.humaneval import CodeExecutionNotAllowed, pass_at_k, pass_at_k_estimate, run_program

ADD = "def add(a, b):\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n\ncheck(add)\n"


def run(code: str, timeout_s: float = 10.0) -> humaneval.ExecResult:
    return run_program(code, allow_code_execution=True, timeout_s=timeout_s, sandbox="python")


def test_correct_solution_passes():
    r = run(ADD + "    return a + b\n" + TEST)
    assert r.passed and r.returncode == 0, r.stderr


def test_wrong_solution_fails_with_its_traceback():
    r = run(ADD + "    return a * b\n" + TEST)
    assert r.status == "failed" and "AssertionError" in r.stderr


def test_infinite_loop_times_out():
    r = run(ADD + "    while True:\n        pass\n" + TEST, timeout_s=2.0)
    assert r.status == "timeout" and r.returncode is None


@pytest.mark.parametrize("code, fragment", [
    ("import socket\nsocket.create_connection(('127.0.0.1', 9))\n", "network"),
    ("import socket\nsocket.socket(socket.AF_INET, socket.SOCK_STREAM)\n", "network"),
    ("import _socket\n_socket.socket()\n", "network"),
    ("import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n", "network"),
])
def test_network_is_refused(code, fragment):
    r = run(code)
    assert r.status == "failed" and fragment in r.stderr


def test_writing_outside_the_temp_dir_fails_and_inside_works(tmp_path):
    outside = tmp_path / "escaped.txt"
    for code in (f"open({str(outside)!r}, 'w').write('x')\n",
                 f"import pathlib\npathlib.Path({str(outside)!r}).write_text('x')\n",
                 f"import os\nos.open({str(outside)!r}, os.O_CREAT | os.O_WRONLY)\n",
                 f"import os\nos.chdir({str(tmp_path)!r})\nopen('escaped.txt', 'w')\n"):
        r = run(code)
        assert r.status == "failed" and "PermissionError" in r.stderr, code
    assert not outside.exists()
    r = run("open('scratch.txt', 'w').write('x')\nassert open('scratch.txt').read() == 'x'\n")
    assert r.passed, r.stderr


@pytest.mark.parametrize("code", [
    "import os\nos.remove({victim!r})\n",
    "import shutil\nshutil.rmtree({folder!r})\n",
    "import subprocess\nsubprocess.run(['rm', {victim!r}])\n",
    "import os\nos.system('rm ' + {victim!r})\n",
    "import os\nos.kill(os.getppid(), 9)\n",
])
def test_destructive_calls_fail(tmp_path, code):
    victim = tmp_path / "keep.txt"
    victim.write_text("still here")
    r = run(code.format(victim=str(victim), folder=str(tmp_path)))
    assert r.status == "failed" and "PermissionError" in r.stderr
    assert victim.read_text() == "still here"


@pytest.mark.parametrize("code", ["import sys\nsys.exit(0)\n", "exit()\n", "import os\nos._exit(0)\n",
                                  ADD + "    raise SystemExit(0)\n" + TEST])
def test_exiting_early_is_not_a_pass(code):
    assert run(code).status == "failed"


def test_memory_limit():
    r = run_program("x = bytearray(8 * 1024 ** 3)\n", allow_code_execution=True, memory_mb=512, sandbox="python")
    assert r.status == "failed" and "MemoryError" in r.stderr


def test_the_child_sees_no_secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    assert run("import os\nassert 'HF_TOKEN' not in os.environ\n").passed


def test_nothing_runs_without_opt_in(monkeypatch):
    def no_process(*args, **kwargs):
        raise AssertionError("a process was started")

    monkeypatch.setattr(subprocess, "Popen", no_process)
    for flag in (False, None, 1, "yes"):
        with pytest.raises(CodeExecutionNotAllowed, match="eval.allow_code_execution=true"):
            run_program("print(1)\n", allow_code_execution=flag)
    with pytest.raises(CodeExecutionNotAllowed):
        pass_at_k([TEST], [[ADD + "    return a + b\n"]], k=[1])  # the metric's default is no opt-in


def test_pass_at_k_estimator():
    assert pass_at_k_estimate(1, 1, 1) == 1.0 and pass_at_k_estimate(1, 0, 1) == 0.0
    assert pass_at_k_estimate(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k_estimate(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k_estimate(4, 3, 2) == 1.0  # n - c < k: some pair always contains a correct one
    with pytest.raises(ValueError):
        pass_at_k_estimate(3, 4, 1)


def test_lm_eval_metric_and_filter():
    progs = humaneval.build_programs([[" return a + b\n", " return a - b\n"]], [{"prompt": ADD + "   "}])
    assert progs == [[ADD + "    return a + b\n", ADD + "    return a - b\n"]]
    out = pass_at_k([TEST], progs, k=[1, 2, 5], allow_code_execution=True, sandbox="python")
    assert out == {"pass@1": 0.5, "pass@2": 1.0}


def test_canonical_solutions_of_the_mirror_pass(data_root: Path):
    """The first problems' reference solutions pass in the sandbox (so correct code is not blocked)."""
    with gzip.open(data_root / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line, _ in zip(f, range(3))]
    for p in problems:
        program = p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
        assert run(program).passed, p["task_id"]


def test_no_network_namespace_needed():
    """Where ``unshare`` is unavailable the socket guard alone refuses connections."""
    humaneval.network_namespace_available.cache_clear()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(humaneval.shutil, "which", lambda name: None)
            assert humaneval.network_namespace_available() is False
            r = run("import socket\nsocket.create_connection(('127.0.0.1', 9))\n")
            assert r.status == "failed" and "network" in r.stderr
    finally:
        humaneval.network_namespace_available.cache_clear()
    assert socket.socket  # the parent's socket module is untouched
