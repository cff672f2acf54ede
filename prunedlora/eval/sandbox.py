"""The OS-level layer of the HumanEval sandbox: bubblewrap (``bwrap``) when it works here.

``eval.sandbox`` picks the level that runs each completion:

* ``bwrap``: every completion runs under bubblewrap (and the Python-level guards of ``humaneval.py`` inside
  it, as a second layer); an error when bubblewrap is missing or does not work on this machine;
* ``python``: the Python-level guards only, an accident guard, **not a security boundary**;
* ``auto`` (default): ``bwrap`` when a probe (run once per process) succeeds, else ``python`` with one
  warning line, but only where bubblewrap itself cannot run (not installed, no user namespaces). Where it runs
  and only the sandbox's own view lacks something the interpreter needs, that is a bug: ``auto`` fails with
  the reason instead of quietly dropping the boundary.

What bubblewrap gives each completion (:func:`bwrap_prefix`):

* new user, PID, IPC, network, UTS and cgroup namespaces (``--unshare-all``, the user namespace required,
  not merely tried); no capabilities, no new privileges (bwrap sets ``PR_SET_NO_NEW_PRIVS``), no nested
  user namespaces (``--disable-userns``), its own session (no terminal injection) and ``--die-with-parent``;
* a read-only view of the system built from an allow-list, not a deny-list: ``/usr`` and the ``/bin``,
  ``/lib*``, ``/sbin`` links, the dynamic loader's cache and the Python installation that runs the
  evaluation (``sys.prefix`` and ``sys.base_prefix``, and the directories the interpreter's symlinks pass
  through); nothing else of the host is there, so the user's home, the run directory, ``/work``, ``/root``,
  ``/etc`` secrets and ``/sys`` are absent. Paths to hide (home, current directory, run directory) that would
  still be visible under an allowed path get an empty tmpfs over them;
* a private, size-capped tmpfs on ``/tmp`` (``HOME`` and ``TMPDIR`` point into the working directory, as
  at the ``python`` level, so a program sees the same environment at both levels). It goes on before the
  Python installation is mounted, so an interpreter or virtual environment under ``/tmp`` (a scratch clone,
  a CI runner's checkout, ``$TMPDIR`` on a cluster) is mounted over it at its own path, alone;
* a minimal ``/dev`` and a ``/proc`` of its own PID namespace;
* the per-completion working directory, bind-mounted read-write at its own path: the only writable place
  that outlives the process, and it is deleted afterwards.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from prunedlora.config import SANDBOX_LEVELS

log = logging.getLogger(__name__)

TMPFS_BYTES = 64 * 2**20
"""Size of the private ``/tmp`` (memory-backed, so it is capped)."""
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
"""Mounted read-only (or recreated as the same symlinks, for merged-/usr systems)."""
LOADER_FILES = ("/etc/ld.so.cache", "/etc/ld.so.conf", "/etc/ld.so.conf.d")
"""What the dynamic loader reads from ``/etc``; nothing else of ``/etc`` is mounted."""
PROBE_TIMEOUT_S = 20.0
FALLBACK_WARNING = ("eval.sandbox=auto: bubblewrap does not work here ({reason}); HumanEval completions run with "
                    "Python-level guards only, which are NOT a security boundary (install bubblewrap or set "
                    "eval.sandbox=python to silence this)")


class SandboxUnavailable(RuntimeError):
    """``eval.sandbox=bwrap`` was asked for and bubblewrap does not work on this machine, or (any level but
    ``python``) bubblewrap works and the sandbox built with it does not."""


class BwrapProblem(NamedTuple):
    """Why the sandbox cannot run here (``str()`` gives the reason)."""

    reason: str
    machine: bool
    """True: bubblewrap itself cannot run on this machine (``auto`` may fall back); False: it runs, and the
    sandbox's own view of the system lacks what the interpreter needs (a bug: no level may fall back)."""

    def __str__(self) -> str:
        return self.reason


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _symlink_dirs(path: str, hops: int = 40) -> list[str]:
    """The directory of ``path`` and of every link target on the way to the real file (``venv/bin/python`` ->
    ``/opt/python/bin/python3`` -> ``python3.11``): each must be visible for ``execve`` to follow the chain."""
    dirs = []
    for _ in range(hops):
        path = os.path.abspath(path)
        dirs.append(os.path.dirname(path))
        if not os.path.islink(path):
            break
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return dirs


def python_roots() -> list[str]:
    """The Python installation the child interpreter needs (venv and base prefix, and the directories of the
    interpreter's symlink chain), outside the system paths, each once (a root under another is left out)."""
    candidates = _symlink_dirs(sys.executable)
    for p in (sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix):
        candidates += [os.path.abspath(p), os.path.realpath(p)]
    candidates.append(os.path.dirname(os.path.realpath(sys.executable)))
    roots: list[str] = []
    for q in sorted(set(candidates), key=len):  # shortest first: a root covers those under it
        if not any(_under(q, s) for s in (*SYSTEM_PATHS, *roots)):
            roots.append(q)
    return roots


def _system_args() -> list[str]:
    args: list[str] = []
    for path in SYSTEM_PATHS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin and the like
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in LOADER_FILES:
        if os.path.exists(path):
            args += ["--ro-bind", path, path]
    return args


@functools.cache
def _newer_flags(exe: str) -> frozenset[str]:
    """Flags of bubblewrap >= 0.8 that this one knows (``--disable-userns``, ``--size``): used when present."""
    try:
        out = subprocess.run([exe, "--help"], capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    text = out.stdout.decode(errors="replace") + out.stderr.decode(errors="replace")
    return frozenset(f for f in ("--disable-userns", "--size") if f in text)


def bwrap_prefix(workdir: Path | str, *, hide: Iterable[Path | str] = (), exe: str | None = None) -> list[str]:
    """The ``bwrap ... --`` argv that runs a command in the sandbox with ``workdir`` as its only writable place.

    Args:
        workdir: The completion's working directory (mounted read-write at the same path, and the cwd).
        hide: Directories that must stay invisible (the user's home, the run directory); the allow-list
            already leaves out anything not under an allowed path, the rest get an empty tmpfs over them.
        exe: The bwrap binary (default: ``bwrap`` on ``PATH``).
    """
    workdir = os.path.realpath(workdir)
    python = python_roots()
    exe = exe or shutil.which("bwrap") or "bwrap"
    newer = _newer_flags(exe)
    size = ["--size", str(TMPFS_BYTES)] if "--size" in newer else []
    args = [exe, "--unshare-all", "--unshare-user", *(["--disable-userns"] if "--disable-userns" in newer else []),
            "--die-with-parent", "--new-session", "--cap-drop", "ALL", *_system_args(),
            "--dev", "/dev", "--proc", "/proc", *size, "--tmpfs", "/tmp"]
    # Mounts apply in order: the Python installation goes on after the private /tmp, so one under /tmp stays
    # visible (alone); the tmpfs over hidden paths after that, so a hidden path inside it is covered too.
    for root in python:
        args += ["--ro-bind", root, root]
    allowed = [*SYSTEM_PATHS, *python]
    for h in sorted({os.path.realpath(h) for h in hide}):
        visible = any(_under(h, a) and h != a for a in allowed)
        if visible and not _under(workdir, h) and not any(_under(r, h) for r in python):
            args += ["--tmpfs", h]
    args += ["--bind", workdir, workdir, "--chdir", workdir, "--"]
    return args


def default_hidden() -> list[str]:
    """What is always hidden: the user's home (``$HOME`` and the password database's) and the current directory."""
    out = {os.path.expanduser("~")}
    try:
        out.add(os.getcwd())
    except OSError:  # a removed current directory: nothing there to hide
        pass
    try:
        import pwd

        out.add(pwd.getpwuid(os.getuid()).pw_dir)
    except (ImportError, KeyError):
        pass
    return sorted(out)


def _run_probe(cmd: list[str], workdir: str) -> str | None:
    """Run ``cmd`` (a bwrap command line whose program writes its PID to ``probe``): None, or what went wrong."""
    try:
        out = subprocess.run(cmd, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False, cwd=workdir,
                             stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cmd[0]} could not run: {e}"
    if out.returncode != 0:
        msg = out.stderr.decode(errors="replace").strip().splitlines()
        return f"{cmd[0]} exited with {out.returncode}: {msg[-1] if msg else 'no message'}"
    pid = Path(workdir, "probe").read_text() if Path(workdir, "probe").exists() else ""
    if pid != "2":  # inside a fresh PID namespace the command is process 2 (bwrap's init is 1)
        return f"the probe ran but not in a fresh PID namespace with a writable working directory (pid {pid!r})"
    return None


def _probe(exe: str) -> BwrapProblem | None:
    """Run the real sandbox once (same flags, same interpreter); if that fails, find out whose fault it is by
    running the same interpreter in the same namespaces with the whole host visible (read-only)."""
    workdir = tempfile.mkdtemp(prefix="prunedlora-bwrap-probe-")
    code = ["-I", "-c", "import os; open('probe', 'w').write(str(os.getpid()))"]
    try:
        problem = _run_probe([*bwrap_prefix(workdir, exe=exe), sys.executable, *code], workdir)
        if problem is None:
            return None
        Path(workdir, "probe").unlink(missing_ok=True)
        whole_host = [exe, "--unshare-all", "--unshare-user", "--die-with-parent", "--ro-bind", "/", "/", "--dev",
                      "/dev", "--proc", "/proc", "--bind", workdir, workdir, "--chdir", workdir, "--"]
        if _run_probe([*whole_host, sys.executable, *code], workdir) is not None:
            return BwrapProblem(problem, machine=True)
        return BwrapProblem(f"{problem} (with the whole host visible the same interpreter runs, so the sandbox "
                            f"lacks a path it needs; the interpreter is {sys.executable}, mounted: "
                            f"{', '.join(python_roots()) or 'nothing outside the system paths'})", machine=False)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@functools.cache
def bwrap_problem() -> BwrapProblem | None:
    """Why the sandbox cannot run here, or None when it works (probed once per process)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return BwrapProblem("bwrap is not installed (the bubblewrap package)", machine=True)
    return _probe(exe)


@functools.cache
def _warn_fallback(reason: str) -> None:
    log.warning(FALLBACK_WARNING.format(reason=reason))


def resolve_level(level: str) -> str:
    """The level that will run for ``eval.sandbox=level``: ``"bwrap"`` or ``"python"``.

    Raises:
        ValueError: ``level`` is not one of :data:`SANDBOX_LEVELS`.
        SandboxUnavailable: ``level == "bwrap"`` and bubblewrap does not work here, or ``level`` is ``auto`` or
            ``bwrap`` and bubblewrap works but the sandbox does not (see :class:`BwrapProblem`).
    """
    if level not in SANDBOX_LEVELS:
        raise ValueError(f"eval.sandbox={level!r} is not one of {', '.join(SANDBOX_LEVELS)}; use auto (bubblewrap "
                         "when it works, else Python-level guards), bwrap (require it) or python.")
    if level == "python":
        return "python"
    problem = bwrap_problem()
    if problem is None:
        return "bwrap"
    if not problem.machine:
        raise SandboxUnavailable(
            f"eval.sandbox={level}: bubblewrap works on this machine but the HumanEval sandbox built with it does "
            f"not: {problem}. That is a bug of prunedlora's sandbox, so it does not fall back to the Python-level "
            "guards on its own; please report it with this message. Meanwhile eval.sandbox=python runs HumanEval "
            "with the Python-level guards only, which are not a security boundary.")
    if level == "bwrap":
        raise SandboxUnavailable(
            f"eval.sandbox=bwrap, but bubblewrap does not work on this machine: {problem}. Install it "
            "(apt-get install bubblewrap, dnf install bubblewrap) and allow user namespaces "
            "(sysctl kernel.unprivileged_userns_clone=1 or user.max_user_namespaces > 0), or set "
            "eval.sandbox=auto to fall back to Python-level guards, which are not a security boundary.")
    _warn_fallback(str(problem))
    return "python"


def wrap(cmd: Sequence[str], level: str, workdir: Path | str, hide: Iterable[Path | str] = ()) -> list[str]:
    """``cmd`` as run at ``level`` (``bwrap``: inside :func:`bwrap_prefix`; ``python``: unchanged)."""
    if level == "bwrap":
        return [*bwrap_prefix(workdir, hide=[*default_hidden(), *hide]), *cmd]
    return list(cmd)
