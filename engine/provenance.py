"""Where a results file came from: the command line and the commit of the code that wrote it."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command() -> str:
    """This process's command line, as a person would type it from the repository root."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("engine/__main__.py", "engine\\__main__.py")):
        argv = ["-m", "engine", *argv[1:]]
    elif argv:
        try:
            argv[0] = str(Path(argv[0]).resolve().relative_to(ROOT))
        except ValueError:
            pass
    return "python " + shlex.join(argv)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# what commands write, not code: a chain of benchmarks in one checkout does not mark the second
# "+changes" for the first one's results file
OUTPUTS = ("results", "RESULTS.md")


def _checkout() -> str:
    """HEAD (short), with "+changes" when a tracked file other than the outputs differs from it."""
    head = _git("rev-parse", "--short", "HEAD") or "unknown"
    changed = _git("status", "--porcelain", "--untracked-files=no", "--", ".", *(f":(exclude){p}" for p in OUTPUTS))
    return head + ("+changes" if changed else "")


def _head() -> str:
    return _git("rev-parse", "--short", "HEAD") or "unknown"


_AT_START: list[str] = []


def start() -> None:
    """Record the checkout now, at the start of a command: the code that runs is the code then
    (a long command's files are written hours later, possibly after new commits)."""
    if not _AT_START:
        _AT_START.append(_checkout())


def commit() -> str:
    """The checkout's commit (short) when the command started (see `start`; else now), with
    "+changes" when tracked files differed from it then, and a note if a commit landed since.
    (Tracked files changing later are not noted: they are mostly the results this command writes.)"""
    if not _AT_START:
        return _checkout()
    first, now = _AT_START[0], _head()
    return first if first.split("+")[0] == now else f"{first} (checkout at {now} when written)"


def stamp() -> dict:
    return {"command": command(), "commit": commit()}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    """The machine a timing was measured on, in words: CPU model, the cores this process may use
    and the instruction set torch dispatches to (timings and float rounding both depend on it)."""
    import torch
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()}, {cores} cores, torch {torch.__version__} on {torch.backends.cpu.get_cpu_capability()}"


def header() -> str:
    """A results file's first line: the command and the commit it ran on."""
    st = stamp()
    return f"# {st['command']} (commit {st['commit']})"


def save_table(lines: list[str], path) -> None:
    """A benchmark's text table, atomically, under a first line naming its command and commit."""
    from engine import atomic
    atomic.save_text(header() + "\n" + "\n".join(lines) + "\n", Path(path))
