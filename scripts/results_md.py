"""Shared by the benchmark scripts: replace one named section of ``docs/RESULTS.md`` in place.

Each script owns the text between ``<!-- section:NAME -->`` and ``<!-- /section:NAME -->``; other
sections are left untouched, so scripts can run in any order.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "RESULTS.md"
HEADER = "# Results\n\nEvery number below was written by a script in `scripts/`; each section names its command.\n"


def git_commit() -> str:
    """Short hash of the checkout these scripts live in ("unknown" outside git)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parents[1], capture_output=True,
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


def command_line() -> str:
    return " ".join(["python"] + sys.argv)
