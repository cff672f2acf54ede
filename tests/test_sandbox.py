"""The OS-level HumanEval sandbox (bubblewrap): hostile completions leave no trace, scores stay right.

The hostile completions get past the Python-level guards on purpose (``ctypes``, ``io.FileIO``), so what
stops them here is bubblewrap. Tests of the strong path skip only when ``bwrap`` is not installed; where it
is installed but does not work, they fail (``SandboxUnavailable``).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from prunedlora.config import DataConfig, EvalConfig
from prunedlora.eval import humaneval, runner, sandbox
from prunedlora.eval.humaneval import pass_at_k, run_program
from prunedlora.eval.sandbox import SandboxUnavailable, resolve_level

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed: "
                                 "apt-get install bubblewrap (make test does so where it runs as root)")
ADD = "def add(a, b):\n"
TEST = "def check(candidate):\n    assert candidate(2, 3) == 5\n\ncheck(add)\n"
SECRET = "TOKEN-" + uuid.uuid4().hex
LIBC = "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
CONNECT = LIBC + """class Addr(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("port", ctypes.c_ushort), ("addr", ctypes.c_uint32),
                ("zero", ctypes.c_char * 8)]
fd = libc.socket(2, 1, 0)
r = libc.connect(fd, ctypes.byref(Addr(2, {port_be}, 0x0100007F)), 16)
assert r == 0, ctypes.get_errno()
"""


@pytest.fixture
def places(request, tmp_path, monkeypatch):
    """Where a completion must not reach: a run directory and a home file outside ``/tmp``, and a private
    temp root for the working directories (so that leftover processes can be found by their argv)."""
    base = request.config.rootpath / ".pytest_cache" / "sandbox" / uuid.uuid4().hex  # ignored by git
    home = Path(tempfile.mkdtemp(prefix=".prunedlora-sandbox-test-", dir=Path.home()))
    run_dir, outside = base / "run", base / "outside"
    run_dir.mkdir(parents=True)
    outside.mkdir()
    (run_dir / "results.json").write_text("{}")
    (home / "secret.txt").write_text(SECRET)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # run_program's mkdtemp: workdirs under tmp_path
    yield {"run": run_dir, "outside": outside, "secret": home / "secret.txt", "work_root": tmp_path}
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)


def _snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for r in roots for p in sorted(r.rglob("*")) if p.is_file()}


def _processes_with(marker: str, deadline_s: float = 60.0) -> list[str]:
    """Processes whose command line contains ``marker``, once none is left or after ``deadline_s``
    (a killed PID namespace is torn down asynchronously: a fork loop's thousands of processes took over 10 s
    on 2 busy cores, and all were gone soon after; a real leak stays forever)."""
    end = time.monotonic() + deadline_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        found.append(pid)
            except OSError:
                continue  # gone meanwhile
        if not found or time.monotonic() > end:
            return found
        time.sleep(0.1)


HOSTILE = {
    "ctypes_open_write": LIBC + "fd = libc.open({outside_file!r}.encode(), os.O_WRONLY | os.O_CREAT, 0o644)\n"
                                "assert fd >= 0 and libc.write(fd, b'x', 1) == 1, ctypes.get_errno()\n",
    "io_fileio": "import io\nio.FileIO({outside_file!r}, 'w').write(b'x')\n",
    "write_run_dir": "import io\nio.FileIO({run_file!r}, 'w').write(b'pwned')\n"
                     "io.FileIO({run_new!r}, 'w').write(b'x')\n",
    "read_home_secret": "import sys\nsys.stderr.write(open({secret!r}).read())\nsys.stderr.flush()\n",
    "os_system": LIBC + "assert libc.system('echo x > {outside_file}'.encode()) == 0\n",
    "fork_loop": LIBC + "while True:\n    libc.fork()\n",
    "allocate_10gb": "x = bytearray(10 * 2**30)\n",
    "infinite_loop": "while True:\n    pass\n",
    "socket_localhost": CONNECT,
}


def _make_venv(parent: Path) -> Path:
    """A virtual environment (no pip: the completion needs only the standard library) under ``parent``."""
    import venv

    root = Path(tempfile.mkdtemp(prefix="prunedlora-sandbox-venv-", dir=parent))
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(root / "venv")
    return root / "venv"


@pytest.fixture(scope="module", params=["/tmp", "home"])
def venv_python(request):
    """The evaluation's interpreter from a virtual environment under ``/tmp`` (where the sandbox puts its
    private tmpfs: scratch clones, CI checkouts, ``$TMPDIR``) or elsewhere (the user's home, hidden too)."""
    env = _make_venv(Path("/tmp") if request.param == "/tmp" else Path.home())
    yield env
    shutil.rmtree(env.parent, ignore_errors=True)


@pytest.fixture
def from_venv(venv_python, monkeypatch):
    """Run this test as if the evaluation ran from ``venv_python`` (what the sandbox reads of the interpreter)."""
    monkeypatch.setattr(sys, "executable", str(venv_python / "bin" / "python"))
    monkeypatch.setattr(sys, "prefix", str(venv_python))
    monkeypatch.setattr(sys, "exec_prefix", str(venv_python))
    sandbox.bwrap_problem.cache_clear()  # probe this interpreter
    yield venv_python
    sandbox.bwrap_problem.cache_clear()


@needs_bwrap
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_completion_leaves_no_trace(name, places, from_venv):
    listener = socket.create_server(("127.0.0.1", 0))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    code = HOSTILE[name].format(outside_file=str(places["outside"] / "x"), run_file=str(places["run"] / "results.json"),
                                run_new=str(places["run"] / "new.txt"), secret=str(places["secret"]),
                                port_be=socket.htons(port))
    watched = (places["run"], places["outside"], places["secret"].parent)
    before = _snapshot(*watched)
    assert resolve_level("auto") == "bwrap", sandbox.bwrap_problem()  # the probe passes from this interpreter
    r = run_program(code, allow_code_execution=True, timeout_s=3.0, sandbox="bwrap", hide=[places["run"]])
    assert r.sandbox == "bwrap" and not r.passed, (r.status, r.stderr)
    assert "bwrap:" not in r.stderr, r.stderr  # the sandbox itself started (no missing path): the program failed
    assert _snapshot(*watched) == before  # nothing written, changed or removed outside the working directory
    assert SECRET not in r.stderr
    assert _processes_with(str(places["work_root"])) == []  # nothing outlives the run
    with pytest.raises(BlockingIOError):  # no connection reached the host's loopback
        listener.accept()
    listener.close()
    assert list(places["work_root"].iterdir()) == []  # the working directory itself is removed


@needs_bwrap
def test_the_guards_did_not_stop_them_bwrap_did(places):
    """The same escapes succeed inside their own working directory: the table above tests the OS layer."""
    inside = ("import io\nio.FileIO('x', 'w').write(b'x')\n" + LIBC +
              "fd = libc.open(b'y', os.O_WRONLY | os.O_CREAT, 0o644)\nassert fd >= 0 and libc.write(fd, b'y', 1) == 1\n"
              "assert open('x').read() + open('y').read() == 'xy'\n")
    r = run_program(inside, allow_code_execution=True, sandbox="bwrap")
    assert r.passed, r.stderr
    probe = ("import os\nst = open('/proc/self/status').read()\n"
             "assert 'NoNewPrivs:\\t1' in st and 'CapEff:\\t0000000000000000' in st, st\n"
             "assert os.getpid() == 2\n"  # its own PID namespace (bwrap's init is 1)
             "assert not os.path.exists({home!r}) and not os.path.exists({run!r})\n"
             "assert sorted(os.listdir('/tmp')) == sorted({{os.getcwd().split('/')[2], *{python!r}}})\n")
    # a private /tmp holding the workdir and, when the interpreter lives under /tmp, the way to it
    python = [r.split("/")[2] for r in sandbox.python_roots() if r.startswith("/tmp/")]
    r = run_program(probe.format(home=str(places["secret"].parent), run=str(places["run"]), python=python),
                    allow_code_execution=True, sandbox="bwrap", hide=[places["run"]])
    assert r.passed, r.stderr


@needs_bwrap
def test_correct_and_wrong_solutions_score_right(data_root: Path):
    with gzip.open(data_root / "humaneval" / "HumanEval.jsonl.gz", "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line, _ in zip(f, range(5))]
    for p in problems:
        test = p["test"] + f"\ncheck({p['entry_point']})\n"
        right = pass_at_k([test], [[p["prompt"] + p["canonical_solution"]]], k=[1], allow_code_execution=True,
                          sandbox="bwrap")
        wrong = pass_at_k([test], [[p["prompt"] + "    return None\n"]], k=[1], allow_code_execution=True,
                          sandbox="bwrap")
        assert (right, wrong) == ({"pass@1": 1.0}, {"pass@1": 0.0}), p["task_id"]


@pytest.mark.parametrize("level", [pytest.param("bwrap", marks=needs_bwrap), "python"])
def test_timeout_kills_everything_it_started(level, places, monkeypatch):
    """The whole process group dies at the timeout; under bwrap even a process that left the group (its own
    session) dies with the PID namespace. The guards are replaced so that the child can start processes."""
    marker = f"6{uuid.uuid4().int % 10**6}.5"
    escapee = "" if level == "python" else f"subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n"
    monkeypatch.setattr(humaneval, "CHILD_SOURCE", f"import subprocess, time\nsubprocess.Popen(['sleep', '{marker}'])\n"
                        f"{escapee}time.sleep(60)\n")
    start = time.monotonic()
    r = run_program("", allow_code_execution=True, timeout_s=2.0, sandbox=level)
    assert r.status == "timeout" and time.monotonic() - start < 10
    assert _processes_with(marker) == []


# ---------------------------------------------------------------------------------- choosing the level
@pytest.fixture
def no_bwrap(monkeypatch):
    sandbox.bwrap_problem.cache_clear()
    sandbox._warn_fallback.cache_clear()
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    yield
    sandbox.bwrap_problem.cache_clear()
    sandbox._warn_fallback.cache_clear()


def test_auto_falls_back_with_one_warning_and_bwrap_refuses(no_bwrap, caplog):
    with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
        assert [resolve_level("auto") for _ in range(3)] == ["python"] * 3
        r = run_program(ADD + "    return a + b\n" + TEST, allow_code_execution=True, sandbox="auto")
    assert r.passed and r.sandbox == "python"
    warnings = [rec.getMessage() for rec in caplog.records]
    assert len(warnings) == 1 and "NOT a security boundary" in warnings[0] and "not installed" in warnings[0]
    with pytest.raises(SandboxUnavailable, match=r"eval.sandbox=bwrap.*bwrap is not installed.*apt-get install"):
        run_program("pass\n", allow_code_execution=True, sandbox="bwrap")
    assert resolve_level("python") == "python"
    with pytest.raises(ValueError, match=r"eval.sandbox='strict' is not one of auto, bwrap, python"):
        resolve_level("strict")


@needs_bwrap
def test_a_path_missing_from_the_sandbox_fails_auto_too(tmp_path, monkeypatch, caplog):
    """bubblewrap works, the sandbox leaves out the interpreter: a bug of the sandbox, so no level falls back to
    the Python guards (quietly losing the boundary); the error says why and names the interpreter."""
    link = tmp_path / "bin" / "python"
    link.parent.mkdir()
    link.symlink_to(os.path.realpath(sys.executable))
    monkeypatch.setattr(sys, "executable", str(link))
    monkeypatch.setattr(sandbox, "python_roots", lambda: [])  # the sandbox "forgets" the interpreter's directory
    sandbox.bwrap_problem.cache_clear()
    try:
        problem = sandbox.bwrap_problem()
        assert problem is not None and not problem.machine and str(link) in str(problem), problem
        with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
            for level in ("auto", "bwrap"):
                with pytest.raises(SandboxUnavailable, match=rf"eval.sandbox={level}: bubblewrap works on this "
                                   r"machine but .*execvp .*bug of prunedlora's sandbox.*eval.sandbox=python"):
                    run_program("pass\n", allow_code_execution=True, sandbox=level)
        assert caplog.records == []  # no fallback warning: nothing ran at a lower level
    finally:
        sandbox.bwrap_problem.cache_clear()


@pytest.mark.parametrize("level", ["auto", "bwrap"])
def test_a_bwrap_that_cannot_run_here_falls_back_under_auto_only(level, tmp_path, monkeypatch, caplog):
    """A bubblewrap that cannot create namespaces on this machine (a container without user namespaces) is the
    machine's limit, not a bug: ``auto`` falls back with its warning, ``bwrap`` refuses."""
    fake = tmp_path / "bwrap"
    fake.write_text("#!/bin/sh\necho 'bwrap: No permissions to creating new namespace' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: str(fake) if name == "bwrap" else None)
    sandbox.bwrap_problem.cache_clear()
    sandbox._warn_fallback.cache_clear()
    try:
        problem = sandbox.bwrap_problem()
        assert problem is not None and problem.machine and "No permissions to creating new namespace" in str(problem)
        if level == "bwrap":
            with pytest.raises(SandboxUnavailable, match="eval.sandbox=bwrap, but bubblewrap does not work"):
                resolve_level(level)
        else:
            with caplog.at_level(logging.WARNING, logger=sandbox.__name__):
                assert resolve_level(level) == "python"
            assert "new namespace" in caplog.records[0].getMessage()
    finally:
        sandbox.bwrap_problem.cache_clear()
        sandbox._warn_fallback.cache_clear()


@needs_bwrap
def test_auto_picks_bwrap_where_it_works():
    sandbox.bwrap_problem.cache_clear()
    assert sandbox.bwrap_problem() is None and resolve_level("auto") == "bwrap"
    assert run_program(ADD + "    return a + b\n" + TEST, allow_code_execution=True).sandbox == "bwrap"


def test_hidden_paths_and_python_are_placed_right(tmp_path):
    """Allow-list view: the interpreter's prefixes are mounted; a hidden path under an allowed one gets a tmpfs,
    one outside all of them needs none; the working directory is bound last, read-write."""
    args = sandbox.bwrap_prefix(tmp_path / "w", hide=[Path(sandbox.python_roots()[0]) / "sub", "/srv"])
    pairs = list(zip(args, args[1:]))
    for root in sandbox.python_roots():
        assert ("--ro-bind", root) in pairs
    assert ("--tmpfs", os.path.join(sandbox.python_roots()[0], "sub")) in pairs and ("--tmpfs", "/srv") not in pairs
    work = os.path.realpath(tmp_path / "w")
    assert args[-6:] == ["--bind", work, work, "--chdir", work, "--"]
    assert {"--unshare-all", "--unshare-user", "--die-with-parent", "--new-session"} <= set(args)


@pytest.mark.parametrize("level", ["python", pytest.param("bwrap", marks=needs_bwrap)])
def test_results_json_records_the_level(level, tiny, byte_tokenizer, tmp_path, data_root):
    cfg = EvalConfig(limit=1, max_gen_toks=4, batch_size=1, allow_code_execution=True, sandbox=level)
    runner.evaluate(tiny, byte_tokenizer, ["humaneval"], cfg, DataConfig(root=str(data_root), hub=False), tmp_path,
                    model_id="tiny", progress=False)
    doc = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert doc["settings"]["humaneval"]["sandbox"] == level and 0.0 <= doc["results"]["humaneval"]["pass@1"] <= 1.0
