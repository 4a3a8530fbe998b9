"""Where a results file came from: the command line and the commit of the code that wrote it."""

from __future__ import annotations

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


def commit() -> str:
    """The checkout's commit (short), with "+changes" when tracked files differ from it."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+changes" if git("status", "--porcelain", "--untracked-files=no") else "")


def stamp() -> dict:
    return {"command": command(), "commit": commit()}
