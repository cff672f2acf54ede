"""HumanEval scoring: each completion runs in its own sandboxed subprocess; unbiased pass@k.

Generated code is only ever run when the user opted in with ``eval.allow_code_execution=true``; every
entry point here refuses to run anything otherwise (:class:`CodeExecutionNotAllowed`).

Two layers run each completion:

1. **OS level** (``eval.sandbox``, :mod:`prunedlora.eval.sandbox`): under bubblewrap, which is a security
   boundary: new user/PID/IPC/network namespaces, a read-only allow-listed view of the system, the working
   directory as the only writable place, the user's home and the run directory absent. ``auto`` (default)
   uses it when a probe succeeds; ``bwrap`` requires it; ``python`` (and ``auto`` without bubblewrap) runs
   the second layer alone. :attr:`ExecResult.sandbox` (and ``results.json``'s settings) record which ran.
2. **Python level**, inside the first (an accident guard in the spirit of openai/human-eval's
   ``execution.py``, **not a security boundary** on its own: ``ctypes`` or ``io.FileIO`` get past it):

* a fresh temporary working directory per completion, removed afterwards; ``HOME`` and ``TMPDIR`` point
  into it, the environment is otherwise empty (no tokens or credentials leak into the child);
* ``python -I`` (isolated mode: no ``PYTHON*`` variables, no user site, no script directory on the path);
* a wall-clock timeout enforced by the parent (the child's whole process group is killed, and under bwrap
  its PID namespace with it) plus ``RLIMIT_CPU``; ``RLIMIT_AS``/``RLIMIT_DATA`` (memory), ``RLIMIT_FSIZE``
  (file size, which also caps the captured stderr), ``RLIMIT_NPROC`` = 0 (no new processes; ignored for
  root outside a user namespace, so it holds under bwrap) and no core files;
* no network: bwrap's own network namespace, or (``python`` level) an empty one when ``unshare --user
  --map-root-user --net`` works; in every case ``socket`` is disabled inside the child;
* writes outside the working directory are refused (``open``/``io.open``/``os.open`` and friends with a
  write mode); destructive ``os``/``shutil``/``subprocess`` functions (remove, rename, chmod, kill, fork,
  exec, system, rmtree, Popen, ...) raise ``PermissionError``;
* a completion passes only if the program (prompt + completion + test + ``check(entry_point)``) runs to
  its end: ``sys.exit`` / ``exit()`` anywhere count as failures, and stdout is discarded.
"""

from __future__ import annotations

import functools
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .sandbox import resolve_level, wrap

DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MEMORY_MB = 2048
DEFAULT_MAX_FILE_MB = 16
PROGRAM_FILE = "program.py"
STDERR_FILE = "stderr.txt"
STDERR_TAIL = 2000


class CodeExecutionNotAllowed(PermissionError):
    """Raised when code would run without ``eval.allow_code_execution=true``."""

    def __init__(self) -> None:
        super().__init__(
            "HumanEval runs model-generated Python code; it only does so with eval.allow_code_execution=true "
            "(each completion runs under bubblewrap when available, in a subprocess with a timeout, resource limits, "
            "no network and a temporary working directory; without bubblewrap this is not a security boundary)."
        )


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one program."""

    status: str
    """passed, failed or timeout."""
    returncode: int | None
    stderr: str
    """The last characters of the child's stderr (a traceback for failures)."""
    sandbox: str = "python"
    """The level that ran it: ``bwrap`` (bubblewrap + Python guards) or ``python`` (Python guards only)."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# The child's first and only code: limits, guards, then the program. Written for this project; runs in
# `python -I -c CHILD_SOURCE <workdir> <timeout_s> <memory_bytes> <max_file_bytes>`.
CHILD_SOURCE = r'''
import builtins, io, os, resource, shutil, socket, subprocess, sys, traceback

def _setup(workdir, timeout_s, memory, max_file):
    limits = [(resource.RLIMIT_CPU, int(timeout_s) + 1), (resource.RLIMIT_AS, memory),
              (resource.RLIMIT_DATA, memory), (resource.RLIMIT_FSIZE, max_file), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_NPROC, 0)]
    for which, value in limits:
        try:
            resource.setrlimit(which, (value, value))
        except (ValueError, OSError):
            pass  # a limit the platform does not allow lowering: the others still apply
    root = os.path.realpath(workdir)

    def inside(path):
        if isinstance(path, int):  # an already open descriptor (stdout, stderr)
            return True
        real = os.path.realpath(os.fspath(path))
        return real == root or real.startswith(root + os.sep)

    def refuse(what):
        def blocked(*args, **kwargs):
            raise PermissionError(f"sandbox: {what} is disabled")
        return blocked

    real_open, real_os_open = builtins.open, os.open

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and not inside(file):
            raise PermissionError(f"sandbox: writing outside the working directory is disabled: {file!r}")
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & write_flags and not inside(path):
            raise PermissionError(f"sandbox: writing outside the working directory is disabled: {path!r}")
        return real_os_open(path, flags, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = guarded_os_open
    def no_socket_class(base):  # a class, not a function: modules such as ssl subclass socket.socket
        def init(self, *args, **kwargs):
            raise PermissionError("sandbox: sockets (network) are disabled")
        return type(base.__name__, (base,), {"__init__": init})

    import _socket
    socket.socket = socket.SocketType = no_socket_class(socket.socket)
    _socket.socket = _socket.SocketType = no_socket_class(_socket.socket)
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo", "gethostbyname"):
        if hasattr(socket, name):
            setattr(socket, name, refuse(f"socket.{name} (network)"))
    for name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "remove", "unlink", "rmdir",
                 "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod",
                 "lchmod", "chown", "fchown", "lchown", "chroot", "chdir", "fchdir", "link", "symlink",
                 "putenv", "unsetenv", "setuid", "setgid", "setsid", "execv", "execve", "execl", "execle",
                 "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
                 "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "plock", "_exit", "abort"):
        if hasattr(os, name):
            setattr(os, name, refuse(f"os.{name}"))
    for name in ("rmtree", "move", "chown", "copytree", "copy", "copy2", "copyfile"):
        setattr(shutil, name, refuse(f"shutil.{name}"))
    for name in ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"):
        setattr(subprocess, name, refuse(f"subprocess.{name}"))

def _main():
    workdir, timeout_s, memory, max_file = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    os.chdir(workdir)
    with open(os.path.join(workdir, "program.py"), encoding="utf-8") as f:
        program = f.read()
    exit_now = os._exit  # kept before the guards disable it: only the sandbox decides the exit status
    _setup(workdir, timeout_s, memory, max_file)
    try:
        exec(compile(program, "program.py", "exec"), {"__name__": "__sandbox__", "__builtins__": builtins})
    except BaseException:  # SystemExit too: a program that exits early has not passed its tests
        traceback.print_exc()
        sys.stderr.flush()
        exit_now(1)
    sys.stderr.flush()
    exit_now(0)

_main()
'''


@functools.cache
def network_namespace_available() -> bool:
    """Whether ``unshare --user --map-root-user --net`` works here (checked once per process)."""
    exe = shutil.which("unshare")
    if exe is None:
        return False
    try:
        probe = subprocess.run([exe, "--user", "--map-root-user", "--net", "true"], capture_output=True,
                               timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return False
    return probe.returncode == 0


def _child_command(workdir: Path, timeout_s: float, memory_mb: int, max_file_mb: int, level: str,
                   hide: Sequence[str | Path]) -> list[str]:
    cmd = [sys.executable, "-I", "-c", CHILD_SOURCE, str(workdir), str(timeout_s), str(memory_mb * 2**20),
           str(max_file_mb * 2**20)]
    if level == "bwrap":  # its own namespaces make the unshare below redundant
        return wrap(cmd, level, workdir, hide)
    if network_namespace_available():
        cmd = [shutil.which("unshare") or "unshare", "--user", "--map-root-user", "--net", "--", *cmd]
    return cmd


def _stderr_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, path.stat().st_size - STDERR_TAIL))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def run_program(program: str, *, allow_code_execution: bool, timeout_s: float = DEFAULT_TIMEOUT_S,
                memory_mb: int = DEFAULT_MEMORY_MB, max_file_mb: int = DEFAULT_MAX_FILE_MB, sandbox: str = "auto",
                hide: Sequence[str | Path] = ()) -> ExecResult:
    """Run one Python program in the sandbox (see the module docstring).

    Args:
        program: Complete source (for HumanEval: prompt + completion + test + ``check(entry_point)``).
        allow_code_execution: Must be True (``eval.allow_code_execution``); nothing runs otherwise.
        timeout_s: Wall-clock limit, process start included.
        memory_mb: Address-space limit of the child.
        max_file_mb: Largest file the child may write (inside its working directory).
        sandbox: ``eval.sandbox``: auto, bwrap or python.
        hide: More directories to keep out of a bwrap sandbox (the run directory); the user's home and the
            current directory always are.

    Returns:
        ``passed`` when the program ran to its end, ``failed`` (an exception, ``sys.exit``, a signal or a
        limit), or ``timeout``.

    Raises:
        CodeExecutionNotAllowed: Without the opt-in.
        SandboxUnavailable: ``sandbox="bwrap"`` where bubblewrap does not work.
    """
    if allow_code_execution is not True:
        raise CodeExecutionNotAllowed()
    level = resolve_level(sandbox)
    workdir = Path(tempfile.mkdtemp(prefix="prunedlora-humaneval-"))
    try:
        (workdir / PROGRAM_FILE).write_text(program, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        with open(workdir / STDERR_FILE, "wb") as err:
            cmd = _child_command(workdir, timeout_s, memory_mb, max_file_mb, level, hide)
            proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, start_new_session=True)  # its own process group, killed as a whole
            try:
                code = proc.wait(timeout=timeout_s)
                status = "passed" if code == 0 else "failed"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                code, status = None, "timeout"
        return ExecResult(status, code, _stderr_tail(workdir / STDERR_FILE), level)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def pass_at_k_estimate(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: ``1 - C(n - c, k) / C(n, k)`` (exact integers)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


# ------------------------------------------------------------------------------- lm-eval entry points
def build_programs(resps: list[list[str]], docs: list[dict]) -> list[list[str]]:
    """lm-eval ``custom`` filter: each completion becomes prompt + completion (lm-eval's ``create_test``)."""
    return [[doc["prompt"] + r for r in resp] for resp, doc in zip(resps, docs, strict=True)]


def pass_at_k(references: list[str], predictions: list[list[str]], k: list[int] | int = 1, *,
              timeout_s: float = DEFAULT_TIMEOUT_S, allow_code_execution: bool = False, sandbox: str = "auto",
              hide: Sequence[str] = ()) -> dict[str, float]:
    """lm-eval metric for one document: run its ``n`` programs with the test appended; ``{"pass@k": v}``.

    ``references[0]`` is the test code followed by ``check(<entry_point>)``; ``predictions[0]`` the
    ``n`` programs of :func:`build_programs`. Values of ``k`` above ``n`` are left out. ``sandbox`` and
    ``hide`` are :func:`run_program`'s.
    """
    ks = [k] if isinstance(k, int) else list(k)
    out: dict[str, float] = {}
    for test, programs in zip(references, predictions, strict=True):
        results = [run_program(p + "\n" + test + "\n", allow_code_execution=allow_code_execution,
                               timeout_s=timeout_s, sandbox=sandbox, hide=hide) for p in programs]
        c = sum(r.passed for r in results)
        out |= {f"pass@{kk}": pass_at_k_estimate(len(results), c, kk) for kk in ks if kk <= len(results)}
    return out
