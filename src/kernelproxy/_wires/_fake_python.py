"""The fake kernel's Python: a private interpreter inside this process, as far as the agent can tell.

A real kernel is another process with its own ``sys.modules``, its own
``IPython`` and its own main thread. The fake kernel (``_fake_kernel``) runs
the real agent source, installed by ``_bootstrap``'s expression, in this
process; this module gives the code it runs a view of its own:

* ``__import__`` (through the namespace's ``__builtins__``, which code
  executed there inherits) serves ``sys``, ``time``, ``IPython``, ``__main__``
  (whose ``__dict__`` is the user namespace, as in IPython) and whatever is
  put in ``sys.modules`` from the kernel's private table, everything else
  from this process;
* unpickling takes those modules from the table too (the host pickles
  ``importlib.import_module(<agent>)`` and cloudpickle's ``subimport``), and
  functions rebuilt from pickles get the kernel's builtins;
* ``time.sleep`` on the kernel's main thread wakes for an interrupt, as a real
  one does for SIGINT; ``os._exit``, ``os.abort`` and ``os.kill`` of its own pid
  end the kernel, not this process;
* what a request prints on the kernel's main thread goes to that request
  (``routed_output``), not to this process's stdout.

Everything else is shared with the host: other modules and their globals,
``os.getpid()``, the file system, linecache.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib
import io
import os
import pickle
import signal
import sys
import threading
import time
import types
from collections.abc import Iterator, MutableMapping
from typing import Any, Callable

import cloudpickle  # type: ignore[import-untyped]

Sink = Callable[[str, str], None]  # (stream name, text): where a request's output goes

_cloudpickle_module = cloudpickle.cloudpickle


class ModuleTable(MutableMapping[str, Any]):
    """The kernel's ``sys.modules``: its own entries over this process's; writes stay private."""

    def __init__(self) -> None:
        self.own: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        return self.own[name] if name in self.own else sys.modules[name]

    def __setitem__(self, name: str, module: Any) -> None:
        self.own[name] = module

    def __delitem__(self, name: str) -> None:
        del self.own[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**sys.modules, **self.own})

    def __len__(self) -> int:
        return len(set(sys.modules) | set(self.own))


class _SysView(types.ModuleType):
    """``sys`` as the kernel sees it: its own ``modules``, the rest read through to the real one."""

    def __init__(self, modules: ModuleTable) -> None:
        super().__init__("sys")
        self.modules = modules

    def __getattr__(self, name: str) -> Any:
        return getattr(sys, name)


class FakePython:
    """One kernel's interpreter state: namespace, module table, builtins, interruptible sleep."""

    def __init__(self) -> None:
        self.modules = ModuleTable()
        self.builtins = {**vars(builtins), "__import__": self._import}
        # As in IPython, the user namespace is the __dict__ of the kernel's __main__ module.
        self.main = types.ModuleType("__main__")
        self.user_ns: dict[str, Any] = self.main.__dict__
        self.user_ns["__builtins__"] = self.builtins
        self.modules["__main__"] = self.main
        self.main_thread: int | None = None  # ident of the kernel's main thread, once it runs
        self.wake = threading.Event()  # set by an interrupt or a death: a sleep on the main thread returns at once
        # Set by the fake kernel: called on the main thread around each sleep, with whether it is starting;
        # after it, the exception the sleep raises (KeyboardInterrupt, the kernel's exit), if any.
        self.on_sleep: Callable[[bool], type[BaseException] | None] = lambda starting: None
        self.on_exit: Callable[[int], None] = _no_exit_hook  # ends the kernel (set by the fake kernel); raises
        self.modules["sys"] = _SysView(self.modules)
        self.modules["time"] = self._time_module()
        self.modules["os"] = self._os_module()
        # The unpickler's view of globals that must resolve in the kernel, not in this process.
        self._redirects: dict[tuple[str, str], Any] = {
            ("importlib", "import_module"): self.import_module,
            ("cloudpickle.cloudpickle", "subimport"): self.import_module,
            ("cloudpickle.cloudpickle", "_make_function"): self._make_function,
            ("cloudpickle.cloudpickle", "_function_setstate"): self._function_setstate,
        }
        self.modules["pickle"] = self._pickle_module()

    def set_ipython(self, shell: Any) -> None:
        """What ``sys.modules["IPython"].get_ipython()`` returns in this kernel."""
        ipython = types.ModuleType("IPython")
        ipython.get_ipython = lambda: shell  # type: ignore[attr-defined]
        self.modules["IPython"] = ipython

    # ------------------------------------------------------------------ imports

    def _import(self, name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        if level == 0 and name in self.modules.own:
            return self.modules.own[name]
        return builtins.__import__(name, globals, locals, fromlist, level)

    def import_module(self, name: str) -> Any:
        """``importlib.import_module`` in the kernel: its own table first."""
        return self.modules.own[name] if name in self.modules.own else importlib.import_module(name)

    # ------------------------------------------------------------------ unpickling

    def _pickle_module(self) -> types.ModuleType:
        """``pickle`` whose ``loads`` resolves globals in the kernel (the agent unpickles with it)."""
        view = types.ModuleType("pickle")
        view.__dict__.update({name: getattr(pickle, name) for name in dir(pickle) if not name.startswith("__")})
        view.loads = self.loads  # type: ignore[attr-defined]
        return view

    def loads(self, data: Any, /, *, buffers: Any = None, **options: Any) -> Any:
        python = self

        class KernelUnpickler(pickle.Unpickler):
            def find_class(self, module: str, name: str) -> Any:
                redirect = python._redirects.get((module, name))
                if redirect is not None:
                    return redirect
                if module in python.modules.own:
                    return getattr(python.modules.own[module], name)
                return super().find_class(module, name)

        return KernelUnpickler(io.BytesIO(data), buffers=buffers, **options).load()

    def _make_function(self, code: Any, globals: dict[str, Any], name: Any, argdefs: Any, closure: Any) -> Any:
        # cloudpickle gives rebuilt functions its own builtins; in a kernel those are the kernel's.
        globals["__builtins__"] = self.builtins
        return types.FunctionType(code, globals, name, argdefs, closure)

    def _function_setstate(self, obj: Any, state: Any) -> None:
        _cloudpickle_module._function_setstate(obj, state)
        obj.__globals__["__builtins__"] = self.builtins  # it puts this process's back (read by Python 3.9 frames)

    # ------------------------------------------------------------------ os: the kernel's process ends, not ours

    def _os_module(self) -> types.ModuleType:
        view = types.ModuleType("os")
        view.__dict__.update({name: getattr(os, name) for name in dir(os) if not name.startswith("__")})
        view._exit = self.on_exit_code  # type: ignore[attr-defined]
        view.abort = lambda: self.on_exit_code(-signal.SIGABRT)  # type: ignore[attr-defined]
        view.kill = self.kill  # type: ignore[attr-defined]
        return view

    def on_exit_code(self, code: int) -> None:
        self.on_exit(code)

    def kill(self, pid: int, sig: int) -> None:
        """``os.kill``: a signal to "this process" (the host's pid, which the kernel reports) acts on the kernel."""
        if pid != os.getpid():
            os.kill(pid, sig)
        elif sig == signal.SIGINT:
            raise KeyboardInterrupt
        elif sig not in (0, signal.SIGCHLD, signal.SIGWINCH, signal.SIGURG):
            self.on_exit(-sig)  # a signal whose default action ends the process

    # ------------------------------------------------------------------ time

    def _time_module(self) -> types.ModuleType:
        view = types.ModuleType("time")
        view.__dict__.update({name: getattr(time, name) for name in dir(time) if not name.startswith("__")})
        view.sleep = self.sleep  # type: ignore[attr-defined]
        return view

    def sleep(self, seconds: float) -> None:
        """``time.sleep`` in the kernel: on its main thread an interrupt ends it, as SIGINT does a real one's."""
        if seconds < 0:
            raise ValueError("sleep length must be non-negative")
        if threading.get_ident() != self.main_thread:
            time.sleep(seconds)
            return
        error = self.on_sleep(True)
        try:
            if error is None:
                self.wake.wait(seconds)
        finally:
            after = self.on_sleep(False)  # always: the kernel must know the sleep is over
        error = error or after
        if error is not None:
            raise error  # here rather than at a random bytecode: a safe place, as a real sleep is for SIGINT


def _no_exit_hook(code: int) -> None:
    raise SystemExit(code)


# ---------------------------------------------------------------------- output of the kernel's main thread


class _Buffer:
    """One request's output on one stream: passed on at each line end and flush."""

    def __init__(self, name: str, sink: Sink) -> None:
        self.name = name
        self.sink = sink
        self.pending: list[str] = []

    def write(self, text: str) -> None:
        self.pending.append(text)
        if "\n" in text:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            text, self.pending = "".join(self.pending), []
            self.sink(self.name, text)


class _ThreadStream:
    """Stands in for sys.stdout/sys.stderr: writes from a kernel's main thread go to its request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fallback: Any = None  # the stream it replaced, for every other thread
        self.buffers: dict[int, _Buffer] = {}

    def write(self, text: str) -> int:
        buffer = self.buffers.get(threading.get_ident())
        if buffer is None:
            return int(self.fallback.write(text))
        buffer.write(text)
        return len(text)

    def flush(self) -> None:
        buffer = self.buffers.get(threading.get_ident())
        if buffer is None:
            if self.fallback is not None:
                self.fallback.flush()
        else:
            buffer.flush()

    def __getattr__(self, name: str) -> Any:  # encoding, isatty(), fileno()...
        return getattr(self.fallback, name)


_streams = {"stdout": _ThreadStream("stdout"), "stderr": _ThreadStream("stderr")}
_routing_lock = threading.Lock()
_routing_users = 0


@contextlib.contextmanager
def routed_output(sink: Sink) -> Iterator[None]:
    """While this runs, what this thread prints goes to ``sink`` (sys.stdout/stderr are replaced meanwhile).

    The streams are swapped only while some kernel runs a request, and put back
    if nobody replaced them since (pytest swaps them between test phases).
    """
    global _routing_users
    ident = threading.get_ident()
    with _routing_lock:
        for name, stream in _streams.items():
            current = getattr(sys, name)
            if current is not stream:
                stream.fallback = current
                setattr(sys, name, stream)
            stream.buffers[ident] = _Buffer(name, sink)
        _routing_users += 1
    try:
        yield
    finally:
        with _routing_lock:
            for stream in _streams.values():
                stream.buffers.pop(ident).flush()
            _routing_users -= 1
            if _routing_users == 0:
                for name, stream in _streams.items():
                    if getattr(sys, name) is stream:
                        setattr(sys, name, stream.fallback)


def flush_routed() -> None:
    """Pass on what this thread printed so far (before a reply, as ipykernel flushes its streams)."""
    ident = threading.get_ident()
    with _routing_lock:
        buffers = [stream.buffers.get(ident) for stream in _streams.values()]
    for buffer in buffers:
        if buffer is not None:
            buffer.flush()
