"""What every script shares: where its results go and the provenance they carry.

- :func:`publish`: the end of every script, print a section and write it into ``docs/RESULTS.md``;
- :func:`update_section`: replace one named section of ``docs/RESULTS.md`` in place. Each script owns the text
  between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->``; other sections are left untouched, so scripts
  can run in any order;
- :func:`provenance`, :func:`machine_description`, :func:`command_line`, :func:`git_commit`: the machine and
  command lines a section names;
- :func:`run_logged`, :func:`run_commit`: a run's ``<label>.log`` begins with the commit it was made at, which the
  sections that collect finished runs report.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "RESULTS.md"
FIGURES = RESULTS.parent / "figures"
HEADER = "# Results\n\nEvery number below was written by a script in `scripts/`; each section names its command.\n"
COMMIT_TAG = "# prunedlora commit "


def git_commit() -> str:
    """Short hash of the checkout these scripts live in ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return commit or "unknown"


def machine_description() -> str:
    """One line: CPU/GPU, cores, torch version, git commit."""
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu
    return (f"{device}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, commit {git_commit()}")


def command_line() -> str:
    """The command as the user typed it: ``python -m scripts.<name> <options>`` for a script run as a module."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    program = ["-m", spec.name] if spec is not None else sys.argv[:1]
    return " ".join(["python", *program, *sys.argv[1:]])


def provenance() -> list[str]:
    """The two lines that close most sections: the machine, and the command that wrote the section."""
    return [f"Machine: {machine_description()}.", f"Command: `{command_line()}`."]


def figure_link(path: Path) -> str:
    """Markdown for a plot under ``docs/figures/``, as ``docs/RESULTS.md`` links it."""
    return f"![{path.stem}](figures/{path.name})"


def update_section(name: str, markdown: str, path: Path = RESULTS) -> None:
    """Write ``markdown`` as section ``name`` of ``path`` (appended if new)."""
    start, end = f"<!-- section:{name} -->", f"<!-- /section:{name} -->"
    block = f"{start}\n{markdown.rstrip()}\n{end}"
    text = path.read_text() if path.exists() else HEADER
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        text = before + block + after
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(name: str, markdown: str, *, write: bool = True, echo: bool = True) -> None:
    """Print ``markdown`` (unless ``echo`` is False: the script printed it as it went) and write it as section
    ``name`` of ``docs/RESULTS.md`` (unless ``write`` is False: the scripts' ``--no-write``)."""
    if echo:
        print(markdown)
    if write:
        update_section(name, markdown)


def run_logged(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    """Run ``command`` from the repository root, appending its output to ``log_path`` after a header line with
    this checkout's commit (read back by :func:`run_commit`) and the command; returns its exit code."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"{COMMIT_TAG}{git_commit()}\n" + " ".join(command) + "\n")
        log.flush()
        return subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              check=False).returncode


def run_commit(run_dir: Path) -> str | None:
    """The commit a run was made at, from the first line of its ``<label>.log`` (None: no such line)."""
    log = run_dir.with_name(run_dir.name + ".log")
    head = log.read_text(encoding="utf-8").split("\n", 1)[0] if log.is_file() else ""
    return head[len(COMMIT_TAG):] if head.startswith(COMMIT_TAG) else None

