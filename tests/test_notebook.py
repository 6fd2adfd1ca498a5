"""Output and display in a real notebook: each call's remote output lands in the cell that made the call.

One notebook is executed with nbclient on this interpreter's ipykernel (the host); its first cell
creates a Kernel, a KernelPool(2) and an AsyncKernel, later cells call printing and displaying functions
(also from threads they start). Every remote
output carries a word naming the cell that made the call, so a test can check that each cell's saved
outputs hold its own remote output and display, and nothing from other cells.
"""

from __future__ import annotations

import re
import sys
import textwrap
from typing import Any

import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from traitlets import default

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("matplotlib")
pytest.importorskip("pandas")

CELLS = {
    "setup": """
        import sys, threading
        import kernelproxy
        k = kernelproxy.start()
        pool = kernelproxy.KernelPool(2)
        ak = await kernelproxy.connect_async(k.info.connection_file)  # an AsyncKernel on the notebook's loop

        def shout(word, lines=2):
            import sys
            for i in range(lines):
                print(f"{word} out {i}")
            print(f"{word} err", file=sys.stderr)
            return word

        def show_frame(word):
            import pandas as pd
            from IPython.display import display
            display(pd.DataFrame({word: [1, 2]}))

        def plot():
            import matplotlib.pyplot as plt
            plt.plot([1, 3, 2])
            plt.show()
            return plt.get_backend()

        def progress(word):
            from IPython.display import clear_output, display
            print(f"{word} before the clear")
            clear_output()
            handle = display(f"{word} first", display_id=True)
            handle.update(f"{word} second")
        print("SETUP done")
    """,
    "call": """
        k.call(shout, "CALLED")
    """,
    "again": """
        k.call(shout, "AGAIN", 1)
        k.submit(shout, "SUBMITTED", 1).result()
    """,
    "pool": """
        sorted(pool.map(shout, ["POOLED-a", "POOLED-b", "POOLED-c"]))
    """,
    "frame": """
        k.call(show_frame, "FRAMED")
    """,
    "figure": """
        backend = k.call(plot)
    """,
    "thread": """
        # A thread this cell starts: its calls' output goes where its own prints go (ipykernel's rule)
        def in_thread():
            print("THREADED local")
            k.call(shout, "THREADED", 1)
            pool.submit(shout, "THREADPOOL", 1).result()
        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
    """,
    "late-start": """
        # A thread started here makes its call while the next cell runs
        go, done = threading.Event(), threading.Event()
        def later():
            go.wait(60)
            print("LATECOMER local")
            k.call(shout, "LATECOMER", 1)
            done.set()
        threading.Thread(target=later).start()
    """,
    "late-call": """
        go.set()
        assert done.wait(60)
    """,
    "async": """
        await ak.call(shout, "AWAITED", 1)
    """,
    "update": """
        k.call(progress, "UPDATED")
    """,
    "discard": """
        quiet = k.options(output="discard")
        _ = quiet.call(shout, "DISCARDED")
        quiet.call(show_frame, "DISCARDED")
        quiet.call(progress, "DISCARDED")
        _ = list(pool.options(output="discard").map(shout, ["DISCARDED"]))
    """,
    "define-fail": """
        def fail(word):
            detail = f"{word} went wrong"
            raise KeyError(detail)  # fail-marker-line
    """,
    "error": """
        k.call(fail, "FAILING")
    """,
    "magic-load": """
        %load_ext kernelproxy
    """,
    "magic": """
        %%remote k
        import os
        print("INCELL printed in the kernel")
        %time in_cell = 6 * 7
        f"INCELL value {in_cell} from {os.getpid()}"
    """,
    "magic-error": """
        %%remote k
        def broken(x):
            return x / 0  # magic-fail-line
        broken("CELLFAIL")
    """,
    "magic-pool": """
        %%remote pool
        import os
        print("PXWORD from", os.getpid())
        "PXWORD value"
    """,
    "reprs": """
        from IPython.display import display
        display(k)
        display(pool)
        k.call_ref(dict, REPRWORD=1)
    """,
    "progress": """
        _ = list(pool.map(shout, ["PROGRESSED"], progress=True))
    """,
    "teardown": """
        await ak.close()
        pool.shutdown()
        k.shutdown()
    """,
}
# The word each cell's remote output carries; none is a substring of another.
WORDS = {
    "call": ["CALLED"],
    "again": ["AGAIN", "SUBMITTED"],
    "pool": ["POOLED"],
    "frame": ["FRAMED"],
    "thread": ["THREADED", "THREADPOOL"],
    "async": ["AWAITED"],
    "update": ["UPDATED"],
    "discard": ["DISCARDED"],
    "magic": ["INCELL"],
    "magic-pool": ["PXWORD"],
    "reprs": ["REPRWORD"],
    "progress": ["PROGRESSED"],
}
RAISING = {"error", "magic-error"}  # cells that end in an error, on purpose


class ThisPython(KernelSpecManager):
    """The notebook's kernel is this interpreter's ipykernel, whatever "python3" kernelspec is installed."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name="this Python",
            language="python",
        )


class ThisPythonKernel(AsyncKernelManager):
    @default("kernel_spec_manager")
    def _this_python(self) -> KernelSpecManager:
        return ThisPython()


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The notebook, executed: its cells by name."""
    mp = pytest.MonkeyPatch()
    mp.delenv("MPLBACKEND", raising=False)  # the kernels get ipykernel's default, the inline backend
    try:
        nb = nbformat.v4.new_notebook()
        for name, source in CELLS.items():
            metadata: dict[str, Any] = {"name": name}
            if name in RAISING:
                metadata["tags"] = ["raises-exception"]  # nbclient goes on after it
            nb.cells.append(nbformat.v4.new_code_cell(textwrap.dedent(source).strip(), metadata=metadata))
        client = nbclient.NotebookClient(
            nb,
            kernel_manager_class=ThisPythonKernel,  # the client owns it: shut down at the end
            kernel_name="python3",
            timeout=120,
            resources={"metadata": {"path": str(tmp_path_factory.mktemp("notebook"))}},
        )
        client.execute()
    finally:
        mp.undo()
    return {cell.metadata["name"]: cell for cell in nb.cells}


def streams(cell: Any, name: str) -> str:
    return "".join(out["text"] for out in cell.outputs if out["output_type"] == "stream" and out["name"] == name)


def displays(cell: Any) -> list[dict[str, Any]]:
    return [out["data"] for out in cell.outputs if out["output_type"] == "display_data"]


def everything(cell: Any) -> str:
    """All text a cell's outputs hold (streams, and every text MIME type of displays and results)."""
    parts = []
    for out in cell.outputs:
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.extend(value for key, value in out["data"].items() if key.startswith("text/"))
    return "\n".join(parts)


def test_each_cells_remote_output_is_in_that_cell_only(cells):
    for name, words in WORDS.items():
        for word in words:
            holders = [other for other, cell in cells.items() if word in everything(cell)]
            expected = [] if name == "discard" else [name]
            assert holders == expected, f"{word} (from cell {name!r}) is in the outputs of {holders}"
    assert everything(cells["setup"]) == "SETUP done\n"
    assert all(not cells[name].outputs for name in ("late-start", "teardown", "define-fail", "magic-load"))


def test_printing_calls(cells):
    call = cells["call"]
    assert streams(call, "stdout") == "CALLED out 0\nCALLED out 1\n"
    assert streams(call, "stderr") == "CALLED err\n"
    assert [out["output_type"] for out in call.outputs if out["output_type"] != "stream"] == ["execute_result"]
    again = cells["again"]
    assert streams(again, "stdout") == "AGAIN out 0\nSUBMITTED out 0\n"
    assert streams(again, "stderr") == "AGAIN err\nSUBMITTED err\n"


def test_pool_task_output_is_labelled_in_the_calling_cell(cells):
    out, err = streams(cells["pool"], "stdout"), streams(cells["pool"], "stderr")
    task_of: dict[str, set[str]] = {}
    for line in out.splitlines() + err.splitlines():
        match = re.fullmatch(r"\[task (\d+)\] POOLED-([abc]) (out [01]|err)", line)
        assert match, f"unexpected line {line!r}"
        task_of.setdefault(match.group(2), set()).add(match.group(1))
    assert sorted(task_of) == ["a", "b", "c"] and all(len(ids) == 1 for ids in task_of.values())
    assert len(out.splitlines()) == 6 and len(err.splitlines()) == 3


def test_dataframe_display(cells):
    (frame,) = displays(cells["frame"])
    assert "<table" in frame["text/html"] and "FRAMED" in frame["text/html"]
    assert "FRAMED" in frame["text/plain"]
    assert not streams(cells["frame"], "stdout") and not streams(cells["frame"], "stderr")


def test_matplotlib_inline_figure(cells):
    (figure,) = displays(cells["figure"])
    assert figure["image/png"].startswith("iVBORw0KGgo")  # base64 of the PNG signature
    assert figure["text/plain"].startswith("<Figure size")
    assert not any(out["output_type"] == "stream" for out in cells["figure"].outputs)


def test_calls_from_a_thread_the_cell_started(cells):
    thread = cells["thread"]
    assert streams(thread, "stdout") == "THREADED local\nTHREADED out 0\n[task 3] THREADPOOL out 0\n"
    assert streams(thread, "stderr") == "THREADED err\n[task 3] THREADPOOL err\n"


def test_a_threads_later_call_goes_where_its_prints_go(cells):
    """ipykernel decides where a thread's output goes; a call's output follows the same rule."""
    import ipykernel

    local = [name for name, cell in cells.items() if "LATECOMER local" in everything(cell)]
    remote = [name for name, cell in cells.items() if "LATECOMER out 0" in everything(cell)]
    assert local == remote
    if int(ipykernel.__version__.split(".")[0]) >= 7:  # a thread without a context: the cell running now
        assert remote == ["late-call"]


def test_async_kernel_in_a_cell(cells):
    assert streams(cells["async"], "stdout") == "AWAITED out 0\n"
    assert streams(cells["async"], "stderr") == "AWAITED err\n"


def test_update_display_and_clear_output(cells):
    update = cells["update"]
    assert [out["output_type"] for out in update.outputs] == ["display_data"]  # the print was cleared
    assert displays(update) == [{"text/plain": "'UPDATED second'"}]


def test_discard_drops_streams_and_displays(cells):
    assert cells["discard"].outputs == []


# ---------------------------------------------------------------------- errors, %%remote, reprs, progress

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def error_of(cell: Any) -> dict[str, Any]:
    (error,) = [out for out in cell.outputs if out["output_type"] == "error"]
    return error


def plain(traceback: list[str]) -> str:
    return ANSI.sub("", "\n".join(traceback))


INTERNALS = ("_sync.py", "_portal.py", "_kernel.py", "_magic.py", "concurrent/futures", "asyncio/")


def test_a_remote_error_renders_like_a_local_one(cells):
    error = error_of(cells["error"])
    assert error["ename"] == "KeyError" and "FAILING went wrong" in error["evalue"]
    assert any(ANSI.search(line) for line in error["traceback"])  # coloured by IPython
    text = plain(error["traceback"])
    remote, _, local = text.partition("The above exception was raised in the kernel, and re-raised here:")
    defined_in = cells["define-fail"].execution_count
    frame = rf"Cell In\[{defined_in}\], line 3,? in fail\n\s*raise KeyError\(detail\)  # fail-marker-line"
    assert re.search(frame, remote), text
    assert re.search(r"-+> *1 k\.call\(fail, \"FAILING\"\)", local), text
    assert not any(internal in text for internal in INTERNALS), text
    assert '"""' not in text  # not the kernel's text quoted


def test_remote_magic_runs_the_cell_in_the_kernel(cells):
    magic = cells["magic"]
    out = streams(magic, "stdout")
    assert out.startswith("INCELL printed in the kernel\n")
    assert "Wall time" in out  # %time, a magic, ran in the kernel
    (value,) = displays(magic)  # the last expression, displayed as a cell of that kernel would
    assert re.fullmatch(r"'INCELL value 42 from (\d+)'", value["text/plain"])
    assert not any(out["output_type"] == "error" for out in magic.outputs)


def test_remote_magic_error_fails_the_cell_with_the_remote_frames(cells):
    error = error_of(cells["magic-error"])
    assert error["ename"] == "TypeError"
    text = plain(error["traceback"])
    assert "return x / 0  # magic-fail-line" in text and 'broken("CELLFAIL")' in text
    assert "in broken" in text
    assert not any(internal in text for internal in INTERNALS), text
    assert "interactiveshell" not in text and "run_cell_magic" not in text  # no IPython machinery


def test_remote_magic_on_a_pool_groups_output_per_kernel(cells):
    cell = cells["magic-pool"]
    lines = streams(cell, "stdout").splitlines()
    label = re.compile(r"\[kernel (\d)\] PXWORD from (\d+)|\[kernel (\d)\]")
    kernels_in_order = []
    for line in lines:
        match = label.fullmatch(line)
        assert match, line
        kernels_in_order.append(match.group(1) or match.group(3))
    assert kernels_in_order == ["0", "0", "1", "1"]  # kernel 0's output, then kernel 1's
    assert [data["text/plain"] for data in displays(cell)] == ["'PXWORD value'", "'PXWORD value'"]


def test_reprs_show_state_without_a_round_trip(cells):
    cell = cells["reprs"]
    kernel_html, pool_html = (data["text/html"] for data in displays(cell))
    assert "state" in kernel_html and "ready" in kernel_html and "pid" in kernel_html and "transport" in kernel_html
    assert "2 of 2 ready" in pool_html and "tasks on it" in pool_html
    (result,) = [out["data"] for out in cell.outputs if out["output_type"] == "execute_result"]
    assert "RemoteRef" in result["text/html"] and "dict" in result["text/html"] and "REPRWORD" in result["text/html"]
    assert result["text/plain"].startswith("<RemoteRef #")


def test_progress_bar_without_ipywidgets_is_the_text_bar_without_a_warning(cells):
    import importlib.util

    if importlib.util.find_spec("ipywidgets") is not None:
        pytest.skip("ipywidgets is installed here: the notebook bar is used")
    for name, cell in cells.items():
        text = everything(cell)
        assert "TqdmWarning" not in text and "IProgress" not in text, name
    bar = streams(cells["progress"], "stderr")
    assert "KernelPool.map" in bar and "100%" in bar  # the text bar, drawn and finished in the calling cell
