"""Type checking a user's code: call(), submit(), call_ref(), remote() and pool submit/map check arguments.

mypy --strict runs over tests/typing/user_script.py, whose lines marked ``# E:`` hold
mistakes a checker must report (wrong argument types, too many arguments, an unknown
keyword, a wrong result type) and whose other lines must pass: right arguments, a
RemoteRef where the remote function takes the object it stands for, ``@k.remote``
keeping the function's signature.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TEST_CACHE

pytest.importorskip("mypy")

SCRIPT = Path(__file__).parent / "typing" / "user_script.py"
# One cache per checkout: mypy's cache, shared by two checkouts, reports the other one's file paths.
MYPY_CACHE = TEST_CACHE / f"mypy-cache-{hashlib.sha256(str(SCRIPT).encode()).hexdigest()[:12]}"


def test_mypy_reports_wrong_arguments_and_only_those(tmp_path):
    expected = {
        number for number, line in enumerate(SCRIPT.read_text().splitlines(), 1) if re.search(r"#\s*E:", line)
    }
    assert len(expected) >= 8
    proc = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--show-error-codes",
            "--cache-dir", str(MYPY_CACHE), str(SCRIPT),
        ],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    reported = {
        int(match.group(1)) for match in re.finditer(rf"^{re.escape(str(SCRIPT))}:(\d+): error", proc.stdout, re.M)
    }
    assert reported == expected, proc.stdout + proc.stderr
    assert "RemoteRef" not in proc.stdout  # the ref passed as the remote object is accepted


def test_remote_keeps_the_signature_at_run_time(kernel):
    import inspect

    def scale(x: int, factor: float = 2.0) -> float:
        return x * factor

    remote_scale = kernel.remote(scale)
    assert inspect.signature(remote_scale) == inspect.signature(scale)
    assert remote_scale.__name__ == "scale"
    assert remote_scale(3) == 6.0
