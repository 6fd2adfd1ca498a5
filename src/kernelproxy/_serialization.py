"""Host-side pickling: the agent's codec, and errors that say what did not pickle.

A value becomes a list of *frames*: frame 0 is the pickle stream, frames 1..n
are the out-of-band buffers (numpy data, bytes, ...), handed over without
copying. The codec lives once, in the agent module (``agent.dumps``), which
both sides run: cloudpickle with protocol 5, faster reductions of datetime and
string arrays, and code objects that keep their file name and source.
When pickling fails we search the value for the innermost part that
does not pickle, so the error can say ``args[1]['conn']: cannot pickle
'socket' object`` instead of a bare cloudpickle traceback.
"""

from __future__ import annotations

import functools
import hashlib
import operator
import pickle
import threading
import types
import weakref
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import cloudpickle  # type: ignore[import-untyped]

from ._exceptions import KernelProxyError, SerializationError
from .agent import _agent as agent

CodeSet = agent.CodeSet  # the code objects already described to one kernel


def dumps(
    value: Any,
    *,
    parts: Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None = None,
    sent_code: CodeSet | None = None,
) -> list[memoryview]:
    """Pickle ``value`` into frames, with the agent's codec (the kernel unpickles with the same).

    ``parts`` names the pieces of ``value`` as the user wrote them (``args[0]``,
    ``kwargs['x']``, a pushed name): on failure the error names the one that broke.
    A function that makes them (``lambda: call_parts(...)``) runs only then, so
    that a trivial call does not pay for naming its parts.
    Functions pickled by value carry their file name and source lines, for the
    kernel's tracebacks; ``sent_code`` holds the code already described to the
    receiving kernel, whose lines are not sent again (None: describe all).
    """
    try:
        frames: list[memoryview] = agent.dumps(value, sent_code)  # type: ignore[no-untyped-call]
    except BaseException as exc:
        if sent_code is not None:
            sent_code.clear()  # this pickle described code that will never arrive
        if isinstance(exc, KernelProxyError) or not isinstance(exc, Exception):
            raise  # a RemoteRef that may not travel says why itself (stale, or another kernel's)
        named = parts() if callable(parts) else parts
        raise SerializationError(_describe_pickling_failure(named or {"the value": value}, exc)) from exc
    return frames


def dumps_call(
    fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any], *, sent_fn: Any = None, sent_code: CodeSet | None = None
) -> list[memoryview]:
    """Pickle the call ``(sent_fn or fn, args, kwargs)`` (``sent_fn``: fn's FunctionRef); errors name the part."""
    return dumps(
        (fn if sent_fn is None else sent_fn, args, kwargs),
        parts=lambda: call_parts(fn, args, kwargs),
        sent_code=sent_code,
    )


def call_parts(fn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Name the parts of a call the way a user reads them, for error messages."""
    named: dict[str, Any] = {"the function": fn}
    named.update({f"args[{i}]": arg for i, arg in enumerate(args)})
    named.update({f"kwargs[{key!r}]": arg for key, arg in kwargs.items()})
    return named


def loads(frames: list[Any], *, what: str = "the kernel's reply") -> Any:
    """Unpickle frames produced by the agent's dumps().

    Whatever unpickling raises becomes a SerializationError, ``SystemExit`` and
    the like included (a reduce can call ``sys.exit``): this runs on the IO
    thread, which must not end.
    """
    try:
        return pickle.loads(frames[0], buffers=frames[1:])
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt) and threading.current_thread() is threading.main_thread():
            raise  # a real Ctrl-C: signals arrive on the main thread (unpickling runs on the IO thread otherwise)
        hint = ""
        if isinstance(exc, (ModuleNotFoundError, AttributeError)):
            missing = agent.missing_module(exc)  # type: ignore[no-untyped-call]
            here = missing["version"] if missing is not None else None
            if here is not None:  # its package is here: most likely another version of it in the kernel
                package = missing["package"]
                hint = (
                    f" {package} {here or '(no version)'} is installed here but lacks {missing['module']}: the kernel"
                    f" probably has another {package} version (k.eval(\"__import__('{package}').__version__\")"
                    " tells), whose pickles name modules this one lacks. Install the same version on both sides."
                )
            else:
                hint = (
                    " The value's class probably exists only in the kernel: import or define it on the host,"
                    " or keep the value in the kernel (call_ref() instead of call(), ref() instead of pull())"
                    " and fetch only what you need."
                )
        raise SerializationError(
            f"could not unpickle {what} on the host: {type(exc).__name__}: {exc}.{hint}"
        ) from exc


GENERIC_MISSING_ADVICE = (
    "If a module is missing, install it in the kernel's environment, or have cloudpickle send it by value: "
    "cloudpickle.register_pickle_by_value(module)"
)


def missing_module_advice(missing: Any) -> str:
    """What to do about a request the kernel could not unpickle, from the agent's ``missing`` report.

    The agent names the module the pickle needed and the version of its
    top-level package in the kernel (None: not importable there); with this
    side's version, the advice tells a version difference from a missing package.
    """
    if not isinstance(missing, dict) or not isinstance(missing.get("package"), str):
        return GENERIC_MISSING_ADVICE
    module, package, there = str(missing.get("module")), missing["package"], missing.get("version")
    here = agent.package_version(package)  # type: ignore[no-untyped-call]
    if here is None:
        return GENERIC_MISSING_ADVICE
    if there is not None and there != here:
        return (
            f"{package} is installed on both sides but its versions differ: {here or 'unknown'} here, "
            f"{there or 'unknown'} in the kernel, and what one version pickles the other cannot always read "
            f"(numpy 2 pickles name numpy._core, which numpy 1 lacks). Install the same {package} on both sides, "
            f"e.g. pip install {_distribution(package)}=={here} in the kernel's environment."
            if here
            else f"Install the same {package} on both sides."
        )
    if there is not None:
        return (
            f"{package} {here} is on both sides, yet the kernel has no {module}: is it a module of yours that only "
            f"this side's sys.path finds? {GENERIC_MISSING_ADVICE}"
        )
    if here:
        return (
            f"{package} is not installed in the kernel's environment ({here} here): install it there, "
            f"e.g. pip install {_distribution(package)}=={here}."
        )
    return (
        f"{package} can be imported here but not in the kernel: install it in the kernel's environment, or, if it "
        f"is your own code, have cloudpickle send it by value: cloudpickle.register_pickle_by_value({package})"
    )


def _distribution(package: str) -> str:
    """The name pip installs ``package`` by (scikit-learn for sklearn), where Python can tell."""
    try:
        from importlib import metadata

        names = metadata.packages_distributions().get(package)  # Python 3.10+
        if names:
            return str(names[0])
    except Exception:
        pass
    return package


def _describe_pickling_failure(parts: Mapping[str, Any], exc: Exception) -> str:
    for name, part in parts.items():
        try:
            cloudpickle.dumps(part, protocol=5)
        except RecursionError as part_exc:
            return _too_deep(name, part_exc)
        except Exception as part_exc:
            try:
                path, culprit, reason = _innermost_unpicklable(part, name, part_exc)
            except RecursionError as deep:
                return _too_deep(name, deep)
            kind = f"{type(culprit).__module__}.{type(culprit).__qualname__}"
            return (
                f"cannot send {path} to the kernel: a {kind} cannot be pickled "
                f"({type(reason).__name__}: {reason}). Nothing was sent. "
                "Create such objects inside the kernel instead (for instance in the function you call)."
            )
    if isinstance(exc, RecursionError):
        return _too_deep("the request", exc)
    return f"cannot pickle the request ({type(exc).__name__}: {exc}). Nothing was sent."


def _too_deep(name: str, exc: RecursionError) -> str:
    return (
        f"cannot send {name} to the kernel: it is nested too deeply to pickle (RecursionError: {exc}). "
        "Nothing was sent. Flatten it, or raise sys.setrecursionlimit() on both sides."
    )


def _function_children(fn: types.FunctionType, path: str) -> Iterator[tuple[str, Any]]:
    """What cloudpickle sends with a function by value: closure variables, defaults, the globals it uses."""
    owner = f"{path}'s" if "'s " not in path else f"{path}, its"  # the function's closure variable 'lock'
    code = fn.__code__
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            yield f"{owner} closure variable {name!r}", cell.cell_contents
        except ValueError:  # an empty cell (a variable assigned later)
            continue
    names = code.co_varnames[code.co_argcount - len(fn.__defaults__ or ()) : code.co_argcount]
    for name, default in zip(names, fn.__defaults__ or ()):
        yield f"{owner} default for {name!r}", default
    for name, default in (fn.__kwdefaults__ or {}).items():
        yield f"{owner} default for {name!r}", default
    for name in _global_names(code):
        if name in fn.__globals__:
            yield f"{owner} global {name!r}", fn.__globals__[name]


def _global_names(code: types.CodeType) -> Iterator[str]:
    """The global names ``code`` and the code nested in it (lambdas, inner functions) may use."""
    yield from code.co_names
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _global_names(const)


def _innermost_unpicklable(value: Any, path: str, exc: Exception) -> tuple[str, Any, Exception]:
    """Descend into containers and instance state to the deepest part that fails on its own."""
    for child_path, child in _children(value, path):
        try:
            cloudpickle.dumps(child, protocol=5)
        except Exception as child_exc:
            return _innermost_unpicklable(child, child_path, child_exc)
    return path, value, exc


def _children(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, types.FunctionType):
        yield from _function_children(value, path)
    elif isinstance(value, types.MethodType):
        yield f"{path}.__self__", value.__self__
        yield f"{path}.__func__", value.__func__
    elif isinstance(value, functools.partial):
        yield f"{path}.func", value.func
        yield from _children(list(value.args), f"{path}.args")
        yield from _children(dict(value.keywords), f"{path}.keywords")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield f"{path}[{key!r}]", item
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield f"{path}[{index}]", item
    elif isinstance(value, (set, frozenset)):
        for item in value:
            yield f"{path} item {item!r}", item
    else:
        state = getattr(value, "__dict__", None)
        if isinstance(state, dict):
            for key, item in state.items():
                yield f"{path}.{key}", item


# ---------------------------------------------------------------------- functions sent once per kernel

FUNCTION_PAYLOAD_MAX = 1 << 20  # bigger function pickles (a closure over a large array) travel with each call
_FINGERPRINT_DEPTH = 4  # helper functions followed this deep; deeper ones count as unstable


class FunctionRef:
    """Stands for a function pickled by value, in a request: the kernel looks it up by the digest of its pickle.

    ``payload`` is that pickle (with the source lines of its code), sent once
    per kernel in the request's ``define`` field; afterwards the digest alone
    travels. A kernel that lost it (restarted, evicted) answers ``undefined`` and
    the host sends it again.
    """

    __slots__ = ("digest", "payload")

    def __init__(self, digest: str, payload: memoryview) -> None:
        self.digest = digest
        self.payload = payload

    def __reduce__(self) -> tuple[Any, ...]:
        kernel_agent = agent._ModuleNamed(agent.MODULE_NAME)  # type: ignore[no-untyped-call]
        return (operator.methodcaller("_cached_function", self.digest), (kernel_agent,))


agent.PLAIN_TYPES.add(FunctionRef)  # its reduction needs no cloudpickle: small requests take the plain pickler


class _Entry:
    __slots__ = ("fingerprint", "ref", "function")

    def __init__(self, function: weakref.ref[Any], fingerprint: list[Any] | None, ref: FunctionRef | None) -> None:
        self.function = function
        self.fingerprint = fingerprint
        self.ref = ref


class FunctionCache:
    """The pickles of functions sent by value, each made once while the function stays the same.

    Process-wide (a pool's kernels share them). A function's pickle by value
    depends on its code, defaults, closure values, attributes and the globals
    its code names; ``_fingerprint`` collects those objects. When all of them
    are immutable (numbers, strings, tuples of them, code, modules and
    functions pickled by reference, helper functions with such fingerprints),
    the same objects mean the same pickle, and an identity check replaces the
    pickling. Otherwise (a global list or dict, a class defined in
    ``__main__``: they can change in place) the function is pickled for every
    request as before, and only the digest saves sending it again.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._lock = threading.Lock()

    def reference(self, function: Any) -> FunctionRef | None:
        """A FunctionRef for ``fn`` if it is a function cloudpickle sends by value (and not too big), else None."""
        if type(function) is not types.FunctionType or _by_reference(function):
            return None
        fn: types.FunctionType = function
        key = id(fn)
        entry = self._entries.get(key)
        if entry is not None and entry.function() is fn and entry.fingerprint is not None:
            fingerprint = _fingerprint(fn)
            if fingerprint is not None and _same(fingerprint, entry.fingerprint):
                return entry.ref
        else:
            fingerprint = _fingerprint(fn)
        frames = dumps(fn, parts={"the function": fn})
        if len(frames) > 1 or frames[0].nbytes > FUNCTION_PAYLOAD_MAX:
            ref = None  # out-of-band buffers or a big closure: not worth keeping in the kernel
        else:
            ref = FunctionRef(hashlib.blake2b(frames[0], digest_size=16).hexdigest(), frames[0])
        with self._lock:
            self._entries[key] = _Entry(weakref.ref(fn, self._forgetter(key)), fingerprint, ref)
        return ref

    def _forgetter(self, key: int) -> Callable[[Any], None]:
        return lambda _: self._forget(key)

    def _forget(self, key: int) -> None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.function() is None:
                del self._entries[key]


FUNCTIONS = FunctionCache()


def _by_reference(obj: Any) -> bool:
    try:
        return bool(cloudpickle.cloudpickle._should_pickle_by_reference(obj))
    except Exception:
        return False


_MISSING = object()
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), type(Ellipsis), range, types.CodeType)


def _fingerprint(fn: types.FunctionType) -> list[Any] | None:
    """The objects ``fn``'s pickle by value is made of, if they are all immutable; else None."""
    parts: list[Any] = []
    return parts if _collect(fn, parts, {id(fn)}, 0) else None


def _collect(fn: types.FunctionType, parts: list[Any], seen: set[int], depth: int) -> bool:
    """Append what ``fn``'s pickle depends on to ``parts``; False if some of it may change in place."""
    try:
        names = cloudpickle.cloudpickle._extract_code_globals(fn.__code__)
    except Exception:
        return False
    own: list[Any] = [fn.__code__, fn.__name__, fn.__qualname__, fn.__module__, fn.__doc__, fn.__defaults__]
    own.append(tuple(sorted(fn.__kwdefaults__.items())) if fn.__kwdefaults__ else None)
    own.extend(_flatten(getattr(fn, "__annotations__", None)))
    own.extend(_flatten(fn.__dict__))
    if fn.__closure__:
        for cell in fn.__closure__:
            try:
                own.append(cell.cell_contents)
            except ValueError:  # an empty cell
                own.append(_MISSING)
    globals_ = fn.__globals__
    for name in sorted(names):
        own.append(name)
        own.append(globals_.get(name, _MISSING))
    parts.extend(own)
    return all(_stable(part, parts, seen, depth) for part in own)


def _flatten(mapping: dict[str, Any] | None) -> list[Any]:
    if not mapping:
        return [None]
    flat: list[Any] = [len(mapping)]
    for key, value in mapping.items():
        flat.extend((key, value))
    return flat


def _stable(value: Any, parts: list[Any], seen: set[int], depth: int) -> bool:
    """Whether ``value`` pickles the same as long as it is the same object (helper functions: see their parts)."""
    if value is _MISSING or isinstance(value, _IMMUTABLE):
        return True
    kind = type(value)
    if kind is tuple or kind is frozenset:
        return len(value) <= 64 and all(_stable(item, parts, seen, depth) for item in value)
    if kind is types.ModuleType or isinstance(value, type):
        return _by_reference(value)
    if kind in (types.BuiltinFunctionType, types.MethodDescriptorType, types.WrapperDescriptorType):
        return True
    if kind is types.FunctionType:
        if id(value) in seen or _by_reference(value):  # recursion, or a function pickled by name
            return True
        if depth >= _FINGERPRINT_DEPTH:
            return False
        seen.add(id(value))
        return _collect(value, parts, seen, depth + 1)
    return False


def _same(first: list[Any], second: list[Any]) -> bool:
    return len(first) == len(second) and all(a is b for a, b in zip(first, second))


def function_refs(fn: Callable[..., Any]) -> tuple[Any, list[FunctionRef]]:
    """What to pickle in place of ``fn``, and the functions that request needs defined."""
    ref = FUNCTIONS.reference(fn)
    return (fn, []) if ref is None else (ref, [ref])
