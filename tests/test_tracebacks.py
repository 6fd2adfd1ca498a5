"""Remote tracebacks show the user's own files, line numbers and source lines.

Whatever cloudpickle does with the file names of the code it pickles by value
(3.1.3 renames them all ``<dynamic-code>``), and whether or not the kernel can
read the file (another machine, a notebook cell that exists only in the host's
linecache).
"""

from __future__ import annotations

import linecache
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import pip_target

from kernelproxy import _serialization as serialization
from kernelproxy.agent import _agent as agent

CELL_SOURCE = textwrap.dedent(
    """\
    def cell_function(x):
        total = x + 1
        raise KeyError(f"cell says {total}")  # cell-marker-line

    def cell_caller(x):
        return cell_function(x * 10)  # caller-marker-line
    """
)


def define_in_fake_cell(filename: str) -> dict:
    """Define functions the way IPython defines a notebook cell's: a file name only linecache knows."""
    linecache.cache[filename] = (len(CELL_SOURCE), None, CELL_SOURCE.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(CELL_SOURCE, filename, "exec"), namespace)
    return namespace


def test_notebook_cell_frames_show_cell_file_line_and_source(kernel, tmp_path):
    filename = str(tmp_path / "no-such-dir" / "ipykernel_4242" / "1234567.py")  # exists nowhere, not in the kernel
    cell = define_in_fake_cell(filename)
    with pytest.raises(KeyError) as info:
        kernel.call(cell["cell_caller"], 4)
    text = info.value.__cause__.traceback
    assert f'File "{filename}", line 6, in cell_caller' in text
    assert "return cell_function(x * 10)  # caller-marker-line" in text
    assert f'File "{filename}", line 3, in cell_function' in text
    assert "cell-marker-line" in text
    assert "<dynamic-code>" not in text
    assert "KeyError: 'cell says 41'" in text


def test_kernel_side_tracebacks_see_the_source_too(kernel, tmp_path):
    """Code in the kernel that formats a traceback itself (logging, traceback.print_exc) sees the lines."""
    filename = str(tmp_path / "elsewhere" / "cell.py")
    cell = define_in_fake_cell(filename)

    def format_inside(fn):
        import traceback

        try:
            fn(1)
        except KeyError:
            return traceback.format_exc()

    text = kernel.call(format_inside, cell["cell_caller"])
    assert "caller-marker-line" in text and "cell-marker-line" in text


def test_a_function_sent_again_is_not_described_again():
    filename = "/nowhere/described-once.py"
    cell = define_in_fake_cell(filename)
    sent = serialization.CodeSet()
    first = bytes(serialization.dumps((cell["cell_caller"], (1,), {}), sent_code=sent)[0])
    second = bytes(serialization.dumps((cell["cell_caller"], (2,), {}), sent_code=sent)[0])
    assert b"caller-marker-line" in first
    assert b"caller-marker-line" not in second
    assert filename.encode() in second  # the file name always travels: it is what the frame shows
    assert len(second) < len(first)
    sent.clear()  # the kernel restarted: describe again
    assert b"caller-marker-line" in bytes(serialization.dumps(cell["cell_caller"], sent_code=sent)[0])


def test_a_failed_pickle_forgets_what_it_described():
    """A pickle that failed never reached the kernel: the code it described must be described next time."""
    cell = define_in_fake_cell("/nowhere/failed-pickle.py")
    sent = serialization.CodeSet()
    with pytest.raises(Exception):  # noqa: B017 - a lock cannot be pickled; which error is tested elsewhere
        serialization.dumps((cell["cell_caller"], (__import__("threading").Lock(),), {}), sent_code=sent)
    assert b"caller-marker-line" in bytes(serialization.dumps(cell["cell_caller"], sent_code=sent)[0])


def test_code_restored_with_its_real_file_name_whatever_cloudpickle_writes(monkeypatch):
    """Round trip through the agent's codec: file name and lines come back, also for nested code."""
    monkeypatch.setitem(sys.modules, agent.MODULE_NAME, agent)  # unpickle here as the kernel would
    source = "def outer():\n    def inner():\n        return 1  # inner-line\n    return inner\n"
    filename = "/nowhere/nested.py"
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(source, filename, "exec"), namespace)
    inner = namespace["outer"]()
    frames = serialization.dumps(inner)
    del linecache.cache[filename]
    agent._sources.pop(filename, None)
    restored = agent.loads(frames)
    assert restored.__code__.co_filename == filename
    assert restored() == 1
    assert linecache.getline(filename, 3).strip() == "return 1  # inner-line"


SCRIPT = textwrap.dedent(
    """\
    import kernelproxy

    def compute(x):
        ratio = x / 0  # script-marker-line
        return ratio

    with kernelproxy.start() as k:
        k.call(compute, 3)
    """
)


def run_script(tmp_path: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    return subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        env={**os.environ, **(env or {})},
    )


def assert_script_traceback(proc: subprocess.CompletedProcess, script: Path) -> None:
    assert proc.returncode == 1, proc.stderr
    err = proc.stderr
    assert f'File "{script}", line 4, in compute' in err, err
    assert "ratio = x / 0  # script-marker-line" in err, err
    assert "ZeroDivisionError: division by zero" in err
    assert "<dynamic-code>" not in err


def test_script_traceback_shows_script_path_line_and_source(tmp_path):
    proc = run_script(tmp_path)
    assert_script_traceback(proc, tmp_path / "user_script.py")


@pytest.mark.slow
def test_script_traceback_with_cloudpickle_3_1_2(tmp_path):
    """cloudpickle 3.1.2 kept file names, 3.1.3 drops them: tracebacks must not depend on it."""
    target = pip_target("cloudpickle", "3.1.2")
    proc = run_script(tmp_path, env={"PYTHONPATH": str(target)})  # the kernel inherits it
    assert_script_traceback(proc, tmp_path / "user_script.py")
    version = subprocess.run(
        [sys.executable, "-c", "import cloudpickle; print(cloudpickle.__version__)"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert version.stdout.strip() == "3.1.2"


# ---------------------------------------------------------------------- no kernelproxy frames in printed tracebacks

ENTRY_POINTS_SCRIPT = textwrap.dedent(
    """\
    import asyncio
    import traceback
    import kernelproxy

    def compute(x):
        return {}[x]  # remote-marker-line

    def report(name, action):
        try:
            action()
        except Exception:
            print(f"==={name}===")
            print(traceback.format_exc())

    with kernelproxy.start() as k:
        report("call", lambda: k.call(compute, "call-key"))  # user-line call
        report("submit", lambda: k.submit(compute, "submit-key").result())  # user-line submit
        remote_compute = k.remote(compute)
        report("remote", lambda: remote_compute("remote-key"))  # user-line remote
        ref = k.call_ref(dict)
        report("ref-method", lambda: ref.pop("ref-key"))  # user-line ref-method
        report("ref-item", lambda: ref["item-key"].get())  # user-line ref-item
        report("ref-operator", lambda: ref + 1)  # user-line ref-operator
        report("pull", lambda: k.pull("no_such_variable"))  # user-line pull
        with kernelproxy.KernelPool(1) as pool:
            report("pool-map", lambda: list(pool.map(compute, ["map-key"])))  # user-line pool-map
            report("pool-submit", lambda: pool.submit(compute, "pool-key").result())  # user-line pool-submit

    async def areport(name, make):
        try:
            await make()
        except Exception:
            print(f"==={name}===")
            print(traceback.format_exc())

    async def main():
        async with await kernelproxy.start_async() as ak:
            await areport("async-call", lambda: ak.call(compute, "a-key"))  # user-line async-call
            await areport("async-submit", lambda: ak.submit(compute, "s-key"))  # user-line async-submit
            await areport("async-remote", lambda: ak.remote(compute)("r-key"))  # user-line async-remote
            aref = await ak.call_ref(dict)
            await areport("async-ref", lambda: aref.pop("k"))  # user-line async-ref

    asyncio.run(main())
    """
)
INTERNAL_FILES = ("kernelproxy/", "concurrent/futures/", "asyncio/")


@pytest.fixture(scope="module")
def entry_point_tracebacks(tmp_path_factory) -> dict[str, str]:
    """Each entry point's printed traceback, from a real script."""
    directory = tmp_path_factory.mktemp("entry-points")
    script = directory / "entry_points.py"
    script.write_text(ENTRY_POINTS_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=directory
    )
    assert proc.returncode == 0, proc.stderr
    blocks = dict(re.findall(r"^===([\w-]+)===\n(.*?)(?=^===|\Z)", proc.stdout, flags=re.M | re.S))
    assert sorted(blocks) == sorted(re.findall(r'report\("([\w-]+)"', ENTRY_POINTS_SCRIPT))
    return {name: text.replace(str(script), "SCRIPT") for name, text in blocks.items()}


@pytest.mark.parametrize(
    "name",
    [
        "call", "submit", "remote", "ref-method", "ref-item", "ref-operator", "pull", "pool-map", "pool-submit",
        "async-call", "async-submit", "async-remote", "async-ref",
    ],
)
def test_printed_traceback_goes_from_the_user_line_to_the_remote_frames(entry_point_tracebacks, name):
    text = entry_point_tracebacks[name]
    local = text.split("The above exception was the direct cause of the following exception:")[-1]
    frames = re.findall(r'^  File "([^"]+)", line \d+, in (\S+)\n(.*)$', local, flags=re.M)
    assert frames, text
    internal = [frame for frame in frames if any(part in frame[0] for part in INTERNAL_FILES)]
    if sys.version_info >= (3, 11):
        assert not internal, text
    else:  # Python 3.9 and 3.10 re-raise with the facade's own frame first: one line of kernelproxy remains
        assert len(internal) <= 1, text
    user = [frame for frame in frames if frame[0] == "SCRIPT"]
    caller = "await make()" if name.startswith("async") else f"# user-line {name}"  # where it is awaited
    assert user and caller in user[-1][2], text
    remote = text.split("The above exception was the direct cause")[0]
    assert "RemoteTraceback" in remote, text
    if not name.startswith(("ref", "pull", "async-ref")):  # the remote function's own frame and line
        assert 'File "SCRIPT", line 6, in compute' in remote and "remote-marker-line" in remote, text


# ---------------------------------------------------------------------- in IPython: rendered by IPython's formatter

IPYTHON_SESSION = textwrap.dedent(
    """    from IPython import get_ipython
    shell = get_ipython()
    shell.run_cell("import kernelproxy; k = kernelproxy.start()")
    shell.run_cell("def compute(x):\\n    return {}[x]  # cell-marker-line")
    shell.run_cell(
        "def wrapper(x):\\n    try:\\n        compute(x)\\n"
        "    except KeyError as exc:\\n        raise ValueError('wrapped') from exc"
    )
    print("=== call")
    shell.run_cell("k.call(compute, 'the-key')")
    print("=== chain")
    shell.run_cell("k.call(wrapper, 'other-key')")
    print("=== pool")
    shell.run_cell("with kernelproxy.KernelPool(1) as pool:\\n    list(pool.map(compute, ['pool-key']))")
    shell.run_cell("k.shutdown()")
    """
)


def test_ipython_renders_remote_frames_with_its_own_formatter(tmp_path):
    """A remote error in IPython: the remote frames as IPython shows frames (the host's cell names), no quoted text."""
    script = tmp_path / "session.py"
    script.write_text(IPYTHON_SESSION)
    proc = subprocess.run(
        [sys.executable, "-m", "IPython", "--colors=nocolor", "--no-banner", str(script)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    sections = dict(re.findall(r"^=== (\w+)\n(.*?)(?=^=== |\Z)", out, flags=re.M | re.S))
    assert sorted(sections) == ["call", "chain", "pool"], out
    for text in sections.values():
        remote, _, local = text.partition("The above exception was raised in the kernel, and re-raised here:")
        assert local, text
        assert re.search(r"Cell In\[\d+\], line 2,? in compute\n\s+return \{\}\[x\]  # cell-marker-line", remote), text
        assert '"""' not in text and "RemoteTraceback" not in text  # no quoted text blob
        assert not any(part in text for part in INTERNAL_FILES), text
        assert re.search(r"Cell In\[\d+\], line \d+\n(.*\n)*-+> +\d+ .*(k\.call|pool\.map)", local), text  # the caller
    chain = sections["chain"]
    assert "The above exception was the direct cause of the following exception:" in chain
    assert chain.index("KeyError: 'other-key'") < chain.index("ValueError: wrapped")
