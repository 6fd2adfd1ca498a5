"""Errors: remote exceptions, what cannot be pickled on either side, and the kernel surviving them."""

from __future__ import annotations

import sys
import textwrap
import threading
import time

import cloudpickle
import pytest

import kernelproxy
from kernelproxy import RemoteError, SerializationError

cloudpickle.register_pickle_by_value(sys.modules[__name__])


class CustomError(Exception):
    """An exception class that exists only in this test module (travels by value)."""

    def __init__(self, code: int, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail


class UnpicklableOnHostError(Exception):
    """Pickles fine, but unpickling calls __init__(*args) with one argument: TypeError."""

    def __init__(self, a, b):
        super().__init__(f"{a}/{b}")


class LockedError(Exception):
    """Cannot be pickled at all: it holds a lock."""

    def __init__(self, message):
        super().__init__(message)
        self.lock = threading.Lock()


def fail_with_value_error(x):
    value = x * 2
    raise ValueError(f"remote boom {value}")  # the-marked-remote-line


def deep_caller(n):
    if n == 0:
        fail_with_value_error(21)
    return deep_caller(n - 1)


def alive(k) -> None:
    """The kernel still answers calls and keeps its namespace working."""
    assert k.call(lambda a, b: a + b, 2, 3) == 5
    k.push(alive_probe=[1])
    assert k.pull("alive_probe") == [1]
    k.delete("alive_probe")


# ---------------------------------------------------------------------- remote exceptions


def test_remote_exception_reraised_as_same_type_with_traceback(kernel):
    with pytest.raises(ValueError, match="remote boom 42") as info:
        kernel.call(fail_with_value_error, 21)
    exc = info.value
    assert type(exc) is ValueError
    cause = exc.__cause__
    assert cause is not None
    assert type(cause).__name__ == "RemoteTraceback"
    text = cause.traceback
    assert "Traceback (most recent call last)" in text
    assert "the-marked-remote-line" in text  # the source line of the remote function
    assert "fail_with_value_error" in text
    assert "test_errors.py" in text
    assert "ValueError: remote boom 42" in text
    assert "the-marked-remote-line" in str(cause)
    # the agent's own frames are not shown to the user
    assert "kernelproxy-agent" not in text
    alive(kernel)


def test_remote_traceback_lists_all_user_frames(kernel):
    with pytest.raises(ValueError) as info:
        kernel.call(deep_caller, 3)
    text = info.value.__cause__.traceback
    assert text.count("in deep_caller") == 4
    assert "in fail_with_value_error" in text


def test_remote_traceback_of_exec_shows_source(kernel):
    with pytest.raises(LookupError) as info:
        kernel.exec("first = 1\nraise LookupError('from exec code')  # exec-marker\n")
    text = info.value.__cause__.traceback
    assert "exec-marker" in text
    assert "line 2" in text
    kernel.delete("first")


def test_builtin_exception_types_preserved(kernel):
    with pytest.raises(KeyError):
        kernel.call(lambda: {}["missing"])
    with pytest.raises(ZeroDivisionError):
        kernel.call(lambda: 1 / 0)
    with pytest.raises(ModuleNotFoundError, match="no_such_module_abc"):
        kernel.call(lambda: __import__("no_such_module_abc"))
    with pytest.raises(OSError) as info:
        kernel.call(open, "/nonexistent/file/for/kernelproxy")
    assert isinstance(info.value, FileNotFoundError)
    assert info.value.errno == 2


def test_custom_exception_defined_in_test_module(kernel):
    def raise_custom():
        raise CustomError(418, "teapot")

    with pytest.raises(CustomError) as info:
        kernel.call(raise_custom)
    assert type(info.value) is CustomError
    assert info.value.code == 418
    assert info.value.detail == "teapot"
    assert "raise CustomError(418" in info.value.__cause__.traceback
    alive(kernel)


def test_exception_chain_in_remote_traceback(kernel):
    def chained():
        try:
            {}["inner-key"]
        except KeyError as exc:
            raise RuntimeError("outer") from exc

    with pytest.raises(RuntimeError, match="outer") as info:
        kernel.call(chained)
    text = info.value.__cause__.traceback
    assert "inner-key" in text
    assert "direct cause" in text


def test_exception_unpicklable_on_host_becomes_remote_error(kernel):
    def raise_it():
        raise UnpicklableOnHostError("left", "right")

    with pytest.raises(RemoteError) as info:
        kernel.call(raise_it)
    err = info.value
    assert isinstance(err, kernelproxy.KernelProxyError)
    assert err.ename == "UnpicklableOnHostError"
    assert err.evalue == "left/right"
    assert "raise UnpicklableOnHostError" in err.traceback
    assert "UnpicklableOnHostError: left/right" in str(err)
    assert "Remote traceback" in str(err)
    alive(kernel)


def test_exception_unpicklable_in_kernel_becomes_remote_error(kernel):
    def raise_it():
        raise LockedError("holding a lock")

    with pytest.raises(RemoteError) as info:
        kernel.call(raise_it)
    assert info.value.ename == "LockedError"
    assert info.value.evalue == "holding a lock"
    assert "raise LockedError" in info.value.traceback
    alive(kernel)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes (add_note) are Python 3.11+")
def test_a_call_option_passed_as_a_keyword_says_where_options_go(kernel):
    """Every keyword goes to the function: one that refuses ``timeout=`` gets a note naming k.options()."""
    with pytest.raises(TypeError, match="takes no keyword arguments") as builtin:
        kernel.call(time.sleep, 0, timeout=0.5)
    assert builtin.value.__notes__ == [
        "kernelproxy: timeout=0.5 went to sleep() as its keyword argument: call() passes every keyword to the "
        "function. Call options are set on a view of the kernel: k.options(timeout=0.5).call(sleep, ...)."
    ]

    def double(x):
        return 2 * x

    with pytest.raises(TypeError, match="unexpected keyword argument 'output'") as python:
        kernel.call_ref(double, 1, output="discard")
    assert "k.options(output='discard').call_ref(" in python.value.__notes__[0]

    # A function that takes the keyword gets it; a TypeError about something else gets no note.
    assert kernel.call(lambda timeout: timeout, timeout=3) == 3
    with pytest.raises(TypeError, match="multiple values for argument .timeout.") as other:
        kernel.call(lambda timeout: timeout, 1, timeout=3)
    assert not getattr(other.value, "__notes__", None)
    alive(kernel)


def test_system_exit_does_not_kill_kernel_or_host(kernel):
    pid = kernel.info.pid
    with pytest.raises(RemoteError) as info:
        kernel.call(sys.exit, 3)
    assert info.value.ename == "SystemExit"
    assert info.value.evalue == "3"
    assert not isinstance(info.value, SystemExit)
    with pytest.raises(RemoteError) as info:
        kernel.exec("raise SystemExit('bye')")
    assert info.value.ename == "SystemExit"
    assert kernel.is_alive()
    assert kernel.info.pid == pid
    alive(kernel)


def test_keyboard_interrupt_raised_by_user_code_is_not_raised_on_host(kernel):
    with pytest.raises(kernelproxy.KernelProxyError) as info:
        kernel.exec("raise KeyboardInterrupt")
    assert not isinstance(info.value, KeyboardInterrupt)
    alive(kernel)


def test_input_in_kernel_fails_fast_instead_of_hanging(kernel):
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        kernel.call(input, "prompt> ")
    assert time.monotonic() - started < 5
    assert isinstance(info.value, (EOFError,)) or "stdin" in type(info.value).__name__.lower()
    alive(kernel)


# ---------------------------------------------------------------------- pickling arguments on the host


def test_unpicklable_nested_argument_names_its_path(kernel):
    with pytest.raises(SerializationError) as info:
        kernel.call(lambda a, b: None, 1, {"ok": 1, "lock": threading.Lock()})
    message = str(info.value)
    assert "args[1]['lock']" in message
    assert "lock" in message.lower()
    alive(kernel)


def test_unpicklable_first_argument_path(kernel):
    with pytest.raises(SerializationError, match=r"args\[0\]\['lock'\]"):
        kernel.call(lambda a: None, {"lock": threading.Lock()})


def test_unpicklable_kwarg_deeply_nested_path(kernel):
    with pytest.raises(SerializationError) as info:
        kernel.call(lambda **kw: None, data={"items": [0, 1, threading.Lock()]})
    assert "kwargs['data']['items'][2]" in str(info.value)


def test_unpicklable_attribute_path(kernel):
    class Holder:
        def __init__(self):
            self.name = "h"
            self.guard = threading.RLock()

    with pytest.raises(SerializationError) as info:
        kernel.call(lambda h: None, [Holder()])
    assert "args[0][0].guard" in str(info.value)


def test_unpicklable_function_closure(kernel):
    lock = threading.Lock()

    def uses_lock():
        return lock.locked()

    with pytest.raises(SerializationError) as info:
        kernel.call(uses_lock)
    assert "cannot send the function's closure variable 'lock' to the kernel" in str(info.value)
    assert "_thread.lock" in str(info.value)


GLOBAL_LOCK = threading.Lock()


def uses_global_lock():
    return GLOBAL_LOCK.locked()


def test_unpicklable_function_global(kernel):
    """This module is pickled by value (register_pickle_by_value above): the function's globals travel."""
    with pytest.raises(SerializationError, match="the function's global 'GLOBAL_LOCK'"):
        kernel.call(uses_global_lock)


def test_unpicklable_nested_closure_and_default(kernel):
    lock = threading.RLock()

    def inner():
        return lock

    def outer(helper=inner):
        return helper()

    with pytest.raises(SerializationError) as info:
        kernel.call(outer)
    assert "the function's default for 'helper', its closure variable 'lock'" in str(info.value)
    with pytest.raises(SerializationError, match=r"args\[0\]'s closure variable 'lock'"):
        kernel.call(lambda f: None, inner)


def test_push_unpicklable_sends_nothing(kernel):
    with pytest.raises(SerializationError) as info:
        kernel.push(push_ok=1, push_bad={"lock": threading.Lock()})
    assert "push_bad['lock']" in str(info.value)
    assert "push_ok" not in kernel
    assert "push_bad" not in kernel


# ---------------------------------------------------------------------- pickling results in the kernel


def test_unpicklable_result_generator(kernel):
    with pytest.raises(SerializationError) as info:
        kernel.call(lambda: (i for i in range(3)))
    assert "generator" in str(info.value)
    assert "call_ref()" in str(info.value)  # what to do instead
    kept = kernel.call_ref(lambda: (i for i in range(3)))  # ...which works
    assert kept.attr("__next__")() == 0
    alive(kernel)


def test_unpicklable_pulled_value(kernel):
    kernel.exec("import threading as _t\nunpicklable_value = _t.Lock()\ndel _t")
    with pytest.raises(SerializationError, match=r"lock.*ref\(name\)"):
        kernel.pull("unpicklable_value")
    with pytest.raises(SerializationError, match=r"exec\(\) and take ref\(name\)"):
        kernel.eval("unpicklable_value")
    with pytest.raises(SerializationError, match=r"ref\.call_ref\('method', \.\.\.\)"):
        kernel.ref("unpicklable_value").get()
    assert "unpicklable_value" in kernel
    kernel.delete("unpicklable_value")
    alive(kernel)


def test_result_of_class_only_in_the_kernel(kernel):
    """A class that lives in a kernel-only module is pickled by reference; the host cannot import it.

    (A class defined in the kernel's __main__ would be pickled by value by
    cloudpickle and arrive fine; see the next test.)
    """
    kernel.exec(
        textwrap.dedent(
            """
            import sys as _sys, types as _types
            _mod = _types.ModuleType("kernel_only_models")
            exec("class KernelOnlyThing:\\n    def __init__(self):\\n        self.v = 1\\n", _mod.__dict__)
            _sys.modules["kernel_only_models"] = _mod
            kernel_thing = _mod.KernelOnlyThing()
            del _sys, _types, _mod
            """
        )
    )
    with pytest.raises(SerializationError) as info:
        kernel.pull("kernel_thing")
    message = str(info.value)
    assert "kernel_only_models" in message
    assert "only in the kernel" in message
    with pytest.raises(SerializationError, match="kernel_only_models"):
        kernel.eval("kernel_thing")
    with pytest.raises(SerializationError, match="kernel_only_models"):
        kernel.call(lambda: __import__("kernel_only_models").KernelOnlyThing())
    # what can be pickled still works
    assert kernel.eval("kernel_thing.v") == 1
    kernel.delete("kernel_thing")
    alive(kernel)


def test_result_of_class_defined_in_kernel_main_arrives_by_value(kernel):
    kernel.exec(
        "class MainOnly:\n    def hello(self):\n        return 'hi from ' + type(self).__name__\nmain_only = MainOnly()"
    )
    value = kernel.pull("main_only")
    assert type(value).__name__ == "MainOnly"
    assert value.hello() == "hi from MainOnly"
    kernel.delete("MainOnly", "main_only")


# ---------------------------------------------------------------------- unpickling arguments in the kernel


def test_argument_from_module_missing_in_kernel(kernel, tmp_path, monkeypatch):
    module_name = "kp_host_only_module_7f3a"
    (tmp_path / f"{module_name}.py").write_text(
        "class HostOnly:\n    def __init__(self, v):\n        self.v = v\n\ndef host_only_function(x):\n    return x\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the host can import it, the kernel cannot
    module = __import__(module_name)
    try:
        assert kernel.call(lambda: __import__("importlib.util").util.find_spec(module_name)) is None
        with pytest.raises(SerializationError) as info:
            kernel.call(lambda x: x.v, module.HostOnly(5))
        message = str(info.value)
        assert module_name in message
        assert "kernel" in message
        with pytest.raises(SerializationError, match=module_name):
            kernel.call(module.host_only_function, 1)  # the function itself is pickled by reference
        with pytest.raises(SerializationError, match=module_name):
            kernel.push(host_only_value=module.HostOnly(1))
        assert "host_only_value" not in kernel
        alive(kernel)
    finally:
        sys.modules.pop(module_name, None)


def test_register_pickle_by_value_fixes_missing_module(kernel, tmp_path, monkeypatch):
    """The advice in the SerializationError message works."""
    module_name = "kp_host_only_module_by_value_91c2"
    (tmp_path / f"{module_name}.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(module_name)
    try:
        with pytest.raises(SerializationError, match="register_pickle_by_value"):
            kernel.call(module.triple, 2)
        cloudpickle.register_pickle_by_value(module)
        try:
            assert kernel.call(module.triple, 2) == 6
        finally:
            cloudpickle.unregister_pickle_by_value(module)
    finally:
        sys.modules.pop(module_name, None)


def test_exception_hierarchy():
    assert issubclass(kernelproxy.CallTimeout, TimeoutError)
    assert issubclass(kernelproxy.KernelClosedError, RuntimeError)
    for name in (
        "RemoteError",
        "CallTimeout",
        "CallInterrupted",
        "SerializationError",
        "EnvironmentMismatchError",
        "ConnectionFileError",
        "KernelStartError",
        "KernelDiedError",
        "KernelClosedError",
        "ProtocolError",
    ):
        assert issubclass(getattr(kernelproxy, name), kernelproxy.KernelProxyError), name
    err = RemoteError("E", "v", "tb text")
    assert (err.ename, err.evalue, err.traceback) == ("E", "v", "tb text")


# ---------------------------------------------------------------------- a module missing on one side, or changed


def test_missing_module_advice_tells_a_version_difference_from_a_missing_package():
    from kernelproxy._serialization import missing_module_advice

    here = pytest.importorskip("numpy").__version__
    differs = missing_module_advice({"module": "numpy._core", "package": "numpy", "version": "1.26.4"})
    assert f"versions differ: {here} here, 1.26.4 in the kernel" in differs
    assert f"pip install numpy=={here}" in differs
    absent = missing_module_advice({"module": "numpy", "package": "numpy", "version": None})
    assert f"numpy is not installed in the kernel's environment ({here} here)" in absent
    same = missing_module_advice({"module": "numpy.gone", "package": "numpy", "version": here})
    assert f"numpy {here} is on both sides, yet the kernel has no numpy.gone" in same
    nowhere = missing_module_advice({"module": "kp_nowhere", "package": "kp_nowhere", "version": None})
    assert "register_pickle_by_value" in nowhere
    assert "register_pickle_by_value" in missing_module_advice(None)  # an older agent: the general advice


def test_result_of_a_module_the_host_has_in_another_version(kernel, tmp_path, monkeypatch):
    """The host has the package, without the module the kernel's version pickled: say so, not "only in the kernel"."""
    package = "kp_versioned_pkg_5d1e"
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("__version__ = '1.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    kernel.exec(
        textwrap.dedent(
            f"""
            import sys as _sys, types as _types
            _pkg = _types.ModuleType("{package}"); _pkg.__version__ = "2.0"; _pkg.__path__ = []
            _mod = _types.ModuleType("{package}.newer")
            exec("class Moved:\\n    pass\\n", _mod.__dict__)
            _sys.modules["{package}"] = _pkg; _sys.modules["{package}.newer"] = _mod
            moved = _mod.Moved()
            del _sys, _types, _pkg, _mod
            """
        )
    )
    try:
        with pytest.raises(SerializationError) as info:
            kernel.pull("moved")
        message = str(info.value)
        assert f"{package} 1.0 is installed here but lacks {package}.newer" in message
        assert "another" in message and "version" in message
        assert "only in the kernel" not in message
    finally:
        kernel.delete("moved")
        sys.modules.pop(package, None)
