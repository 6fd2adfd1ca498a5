"""%%remote outside a notebook: terminal IPython, both transports, and what a wrong target says.

The notebook test (tests/test_notebook.py) checks where the output lands in a real notebook;
this one runs an IPython shell in a subprocess, as a user's terminal session would.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("IPython")

SESSION = textwrap.dedent(
    """\
    from IPython import get_ipython
    shell = get_ipython()
    def cell(name, code):
        print(f"=== {name}", flush=True)
        shell.run_cell(code)
    cell("load", "%load_ext kernelproxy")
    cell("start", "import kernelproxy; k = kernelproxy.start(transport=TRANSPORT); not_a_kernel = 3")
    cell("run", "%%remote k\\nprint('printed in', __import__('os').getpid())\\nkept = 40 + 2\\nkept")
    cell("kept", "%%remote k\\n%who_ls int")
    cell("error", "%%remote k\\ndef broken():\\n    return 1 / 0  # broken-line\\nbroken()")
    cell("missing", "%%remote nowhere\\n1")
    cell("wrong", "%%remote not_a_kernel\\n1")
    cell("local", "print('host has kept:', 'kept' in dir())")
    cell("end", "k.shutdown()")
    """
)


@pytest.mark.parametrize("transport", ["comm", "execute"])
def test_remote_magic_in_a_terminal_ipython(tmp_path, transport):
    script = tmp_path / "session.py"
    script.write_text(SESSION.replace("TRANSPORT", repr(transport)))
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--colors=nocolor", "--no-banner", str(script)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=180, cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # stdout and stderr in the order they were written
    )
    out = proc.stdout
    sections = dict(re.findall(r"^=== (\w+)\n(.*?)(?=^=== |\Z)", out, flags=re.M | re.S))
    assert re.fullmatch(r"printed in (\d+)\n42\n", sections["run"]), out
    assert "kept" in sections["kept"]  # the variable lives in the kernel's namespace
    error = sections["error"]
    assert "return 1 / 0  # broken-line" in error and "ZeroDivisionError: division by zero" in error
    assert "kernelproxy" not in error and "run_cell_magic" not in error, error
    assert "UsageError: %%remote: no variable 'nowhere' in this notebook" in sections["missing"]
    assert "UsageError: %%remote: not_a_kernel is a int, not a Kernel or KernelPool" in sections["wrong"]
    assert sections["local"] == "host has kept: False\n"
