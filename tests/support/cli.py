"""The edgemeta CLI run in a subprocess, and the check that it failed with one line naming the fault."""

from __future__ import annotations

import subprocess
import sys


def run(*args, exe=None):
    cmd = [exe, *args] if exe else [sys.executable, "-m", "edgemeta", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def one_line_error(proc, fragment):
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
