"""kernelproxy's agent: the code that runs *inside* the kernel.

This file is sent to the kernel as source and executed there as the module
``_kernelproxy_agent_v<PROTOCOL>`` (registered in ``sys.modules``; nothing is
added to the user's namespace). It must therefore:

* import only the standard library at module level (cloudpickle is imported
  on first use, so that a kernel without it can still say so in the handshake);
* never import the host package ``kernelproxy``;
* stay valid Python 3.8 syntax (a test compiles it for that version).

Wire format (protocol 1)
------------------------
Every request is a JSON-able *header* dict plus a list of binary *frames*;
every reply likewise. The header's ``op`` picks a handler from ``HANDLERS``;
frame 0 of a request or reply carrying a Python value is a pickle-protocol-5
stream whose out-of-band buffers are frames 1..n.

Request ops and their headers:

=========  ==========================  ======================================
op         header fields               frames
=========  ==========================  ======================================
call       (none)                      pickle of (fn, args, kwargs)
push       (none)                      pickle of {name: value}
pull       names: [str]                (none)
exec       code: str                   (none)
eval       expr: str                   (none)
delete     names: [str]                (none)
contains   name: str                   (none)
echo       (none)                      any; returned as they came
ref_name   name: str                   (none)
ref_eval   root: int, keep: bool       pickle of the path (tuple of steps)
release    ids: [int]                  (none)
cell       code: str                   (none)
=========  ==========================  ======================================

``call`` with ``keep: true`` keeps the result here instead of returning it.
``cell`` runs ``code`` through IPython's cell machinery (``%%remote``).
Kept objects live in ``_objects`` under an id, until the host releases them;
a reply that keeps one carries ``ref: {"id", "type", "repr", "agent"}``. A path step is
``("getattr", name)``, ``("getitem", key)``, ``("call", args, kwargs)`` or
``("op", operator_name, args)``; a RemoteRef inside arguments unpickles here
as ``resolve(id, path, agent)``: the kernel's own object.

``agent`` is this agent's *instance id*, made when it is installed in a kernel
process (an upgrade keeps it; ``hello()`` reports it). Object ids start over
in a restarted kernel, so a ref names the instance that kept its object:
``resolve``, ``ref_eval`` (header field ``agent``) refuse a ref of another
instance with an error of kind ``stale``, and ``release`` (header field
``agent``) ignores ids of another instance, so a stale ref never reaches, nor
frees, another client's object.

Request ids: a comm request's data, or the execute transport's ``once()``,
may carry ``rid`` (unique per request, the same when the host sends the request
again). The agent remembers the last ``HANDLED_MAX`` ids it ran: a request
whose ``rid`` already ran is not run again; it gets the reply kept for it
(``keep_reply: true`` asks to keep replies, for wires that may lose them: a
Jupyter Server websocket) or an error of kind ``lost``. ``ack: [rid, ...]``
drops kept replies the host has received; kept replies are bounded by
``KEPT_MAX_BYTES`` (the newest is kept whatever its size). ``cancel(rid)``
stops a request that runs on another thread (a subshell) by raising
KeyboardInterrupt there (``PyThreadState_SetAsyncExc``), which Python raises at
the next bytecode: code in C is not stopped until it returns.

Reply headers:

* ``{"status": "ok"}`` with frames holding the pickled value (call, pull,
  eval), or no frames (push, exec, delete), or ``"result": bool`` (contains).
* ``{"status": "error", "kind": K, "ename", "evalue", "traceback"}`` where K is
  ``exception`` (user code raised; frame 0, if present, is the pickled
  exception; a KeyboardInterrupt the code raised itself is one too),
  ``interrupted`` (a SIGINT, or a subshell's ``cancel``, interrupted the
  request), ``deserialize`` (the request could not be unpickled here),
  ``serialize`` (the result could not be pickled here), ``stale`` (a ref of
  another agent instance), ``lost`` (a request sent again whose reply is no
  longer kept) or ``protocol`` (malformed request: corruption or a version
  mismatch). An ``exception`` reply also has ``stack``: the traceback as data
  (see ``_stack``), for hosts that render it themselves. A ``deserialize``
  reply whose pickle named a module it could not find has ``missing``:
  ``{"module", "package", "version"}``, the package's version here (None: not
  importable), so the host can tell a missing package from a version
  difference. For ``deserialize`` and ``serialize``, frames, if present, are
  the pickled original error (a ``ModuleNotFoundError``...).

The execute transport's replies (``ex``) also carry ``agent``, the instance id.

The execute transport reaches this module through ``user_expressions`` and
moves frames as base64 text (``ex``, ``alloc``, ``put``, ``get``, ``free``);
replies come back as a display bundle under ``MIME``, never as text/plain.

The comm transport opens a comm on target ``COMM_TARGET`` (registered by
``listen()``). The agent answers the comm_open with ``{"opened": ALGORITHM}``,
the buffer-digest algorithm it picked from the host's offer. Each request is
a comm_msg with data ``{"header": ..., "digest": ...}`` and the frames as
binary buffers, zero-copy; the reply comes back the same way on IOPub, or
on shell (see ``reply_on``).
Jupyter's HMAC signature covers the data, not the buffers, so ``digest``
(the hash of all buffers, in order) is what makes buffers tamper-evident: a
request whose buffers do not match is refused, never unpickled.

The comm_open data may also carry ``reply_on: "shell"`` (replies go to the
requester on the shell channel, which Jupyter Server does not throttle; the
answer says ``reply_on`` as granted) and ``part_size`` (the wire's message
limit). Then frames bigger than that travel in parts: the host sends
``{"part": {"upload", "index", "offset", "sizes"}}`` messages of one buffer
each ahead of the request, whose data names the ``upload`` instead of
carrying buffers (``{"part": {"upload", "abort": true}}`` drops a half-sent
one); the agent sends ``{"part": {"index", "offset", "sizes"}}`` messages
ahead of a big reply, whose data then says ``parts: N``. Parts get no answer.
With subshells (ipykernel >= 7) a comm opened on a subshell answers on that
subshell's socket; a request's ``header.subshell_id`` picks the thread it runs on.
"""

import binascii
import json
import linecache
import os
import platform
import sys
import threading
import traceback
from types import CodeType

PROTOCOL = 1
# Raised at every change of this file (a test holds the hash of each revision's source): a kernel that has
# an older revision installed (a long-lived kernel, used by an older kernelproxy) gets this one in its place.
REVISION = 6
MODULE_NAME = "_kernelproxy_agent_v%d" % PROTOCOL
MIME = "application/vnd.kernelproxy.v%d+json" % PROTOCOL
# The execute transport puts request frames (base64) under this key of the
# execute_request content, where kernels that expose their parent message
# (ipykernel >= 6) let us read them without compiling them as a literal.
CONTENT_KEY = "kernelproxy_frames"
AGENT_FILENAME = "<kernelproxy-agent>"
# Pickle buffers smaller than this stay in-band: a frame per tiny buffer costs more than it saves.
OUT_OF_BAND_MIN = 64 * 1024

try:  # SIMD base64, 4-5x faster than binascii; optional, the agent needs only the stdlib
    from pybase64 import b64decode as _pybase64_decode
    from pybase64 import b64encode as _b64encode

    def _b64decode(text):
        return _pybase64_decode(text, validate=True)  # validate=True takes the SIMD path

except ImportError:
    _b64decode = binascii.a2b_base64

    def _b64encode(data):
        return binascii.b2a_base64(data, newline=False)


COMM_TARGET = "kernelproxy.v%d" % PROTOCOL

_exec_counter = [0]
_uploads = {}  # transfer id -> list of bytearray frames being filled by put()
_parts = {}  # upload id -> PartsAssembly: a comm request's frames arriving in parts
_outbox = {}  # transfer id -> list of memoryview frames waiting for get()


def _cloudpickle():
    import cloudpickle  # imported lazily: hello() must work without it

    return cloudpickle


# --------------------------------------------------------------------- pickling


def dumps(value, sent_code=None):
    """Pickle ``value``; return [main, *out_of_band_buffers] as memoryviews.

    The codec of both sides: the host pickles with it too. ``sent_code`` (a
    ``CodeSet``) names the code objects whose source the receiver has already.
    """
    buffers = []

    def keep_large_out_of_band(buf):
        raw = buf.raw()
        if raw.nbytes < OUT_OF_BAND_MIN:
            return True  # true: serialize in-band
        buffers.append(raw)
        return False

    import io

    with io.BytesIO() as file:
        pickler = _pickler_class()(file, protocol=5, buffer_callback=keep_large_out_of_band)
        pickler.sent_code = sent_code
        pickler.dump(value)
        main = file.getvalue()
    return [memoryview(main)] + buffers


_pickler = []  # the cloudpickle.Pickler subclass, made on first use (cloudpickle is imported lazily)
HOST_MODULE = "kernelproxy.agent._agent"  # this file's module name on the host
# Object arrays with at least this many elements are tried as strings (see _strings_reduce).
STRINGS_MIN = OUT_OF_BAND_MIN // 8
_STRINGS_CHUNK = 1 << 20  # strings joined and decoded per chunk: bounds the temporary text


def _pickler_class():
    if not _pickler:
        base = _cloudpickle().Pickler

        class Pickler(base):
            """cloudpickle, plus array reductions that cut pickling time (see _array_reduce)."""

            sent_code = None  # a CodeSet: code whose source the receiver has (see code_reduce)

            def __init__(self, *args, **kwargs):
                base.__init__(self, *args, **kwargs)
                numpy = sys.modules.get("numpy")  # not imported: no ndarray in the value either
                self._ndarray = None if numpy is None else numpy.ndarray

            def reducer_override(self, obj):  # called for almost every object: keep the common path short
                if type(obj) is self._ndarray:
                    reduced = _array_reduce(obj)
                    if reduced is not None:
                        return reduced
                elif type(obj) is CodeType:
                    return code_reduce(self, obj, self.sent_code)
                return base.reducer_override(self, obj)

        _pickler.append(Pickler)
    return _pickler[0]


def _array_reduce(obj):
    """A faster reduction for some large numpy arrays, or None for numpy's own.

    * datetime64/timedelta64: numpy copies them into the pickle stream (their
      dtype has no buffer format). We reduce their int64 view the way numpy
      reduces any buffer-compatible array (``_frombuffer(buffer, dtype, shape,
      order)``, numpy's own reconstructor) with the dtype swapped back, so the
      data goes out-of-band and the receiver needs numpy alone.
    * object arrays holding mostly ``str``: numpy pickles every element on its
      own (about 0.3 us each, plus the memo). ``_strings_reduce`` sends the
      strings as one UTF-8 buffer instead.

    Used on both sides: the host pickles with this module's ``dumps`` too.
    """
    numpy = sys.modules.get("numpy")  # no numpy imported: no ndarray to see
    if numpy is None or type(obj) is not numpy.ndarray:
        return None
    kind = obj.dtype.kind
    if kind == "O":
        return _strings_reduce(obj, numpy)
    if kind not in "mM" or obj.nbytes < OUT_OF_BAND_MIN:
        return None
    flags = obj.flags
    if not (flags.c_contiguous or flags.f_contiguous):
        return None
    reduced = obj.view(numpy.int64).__reduce_ex__(5)
    if len(reduced) != 2 or len(reduced[1]) != 4:  # not numpy's protocol-5 (_frombuffer) form
        return None
    rebuild, (buffer, _int64, shape, order) = reduced
    return (rebuild, (buffer, obj.dtype, shape, order))


def _strings_reduce(obj, numpy):
    """Reduce a large object array whose elements are mostly exact ``str``.

    The strings travel as chunks of NUL-joined UTF-8 text (``surrogatepass``:
    any str survives) in one buffer; the other elements ("holes": None, NaN,
    pd.NA, str subclasses...) are pickled normally with their positions. The
    receiver splits the text back (``_strings_rebuild``, which this reduction
    names in the receiving side's agent module). Equal strings come back equal
    but not identical (pickle's memo would have kept shared str objects shared).
    Declines (None) for small arrays, a string containing NUL, or more holes
    than strings. Shape, order (C or F) and writability match numpy's pickles.
    """
    if obj.size < STRINGS_MIN or obj.dtype.metadata is not None:
        return None
    order = "F" if obj.flags.f_contiguous and not obj.flags.c_contiguous else "C"
    flat = obj.ravel(order)  # a view unless obj is not contiguous
    sample = flat[:: flat.size // 256].tolist()  # cheap: decline arrays of other objects early
    if 2 * sum(type(item) is str for item in sample) < len(sample):
        return None
    items = flat.tolist()
    types = set(map(type, items))
    holes = values = ()
    if types != {str}:
        if str not in types:
            return None
        holes = [index for index, item in enumerate(items) if type(item) is not str]
        if 2 * len(holes) > len(items):
            return None
        values = [items[index] for index in holes]
        for index in holes:
            items[index] = ""
    pieces = []
    for start in range(0, len(items), _STRINGS_CHUNK):
        chunk = items[start : start + _STRINGS_CHUNK]
        text = "\0".join(chunk)
        if text.count("\0") != len(chunk) - 1:
            return None  # a string holds NUL itself
        pieces.append(text.encode("utf-8", "surrogatepass"))
    ends = []
    end = 0
    for piece in pieces:
        end += len(piece)
        ends.append(end)
    import operator
    import pickle

    data = pickle.PickleBuffer(pieces[0] if len(pieces) == 1 else b"".join(pieces))
    rebuild = operator.methodcaller("_strings_rebuild", data, ends, holes, values, obj.shape, order)
    return (rebuild, (_receiving_agent(),))


def _strings_rebuild(data, ends, holes, values, shape, order):
    """The receiving side of ``_strings_reduce``: a new, writable object array."""
    import numpy

    view = memoryview(data)
    items = []
    start = 0
    for end in ends:
        items.extend(str(view[start:end], "utf-8", "surrogatepass").split("\0"))
        start = end
    flat = numpy.array(items, dtype=object)
    for index, value in zip(holes, values):
        flat[index] = value
    return flat.reshape(shape, order=order)


def _receiving_agent():
    """Pickles as the agent module of the side that unpickles (the kernel's, or the host's copy)."""
    return _ModuleNamed(HOST_MODULE if __name__ == MODULE_NAME else MODULE_NAME)


# --------------------------------------------------------------------- code objects and their source

_sources = {}  # file name -> {line number: source line} of code received by value


def code_reduce(pickler, code, sent):
    """Reduce a code object so that it keeps its real file name and brings its source lines.

    cloudpickle (>= 3.1.3) names the file of all code it pickles by value
    ``<dynamic-code>``; and the receiving side usually cannot read the sender's
    file (another machine, a notebook cell). So the code travels as
    cloudpickle reduces it, plus its real ``co_filename`` and the source lines
    its line table covers, which ``_restore_code`` on the receiving side puts
    back and registers for tracebacks. ``sent`` (a ``CodeSet`` or None)
    remembers the code objects already described to the receiver: their lines
    are not sent again.
    """
    import operator

    rebuild, args = pickler.dispatch_table[CodeType](code)
    filename, first, lines = code.co_filename, code.co_firstlineno, None
    if sent is None or sent.add(code):
        lines = _source_lines(code)
    restore = operator.methodcaller("_restore_code", rebuild, args, filename, first, lines)
    return (restore, (_receiving_agent(),))


def _source_lines(code):
    """The source lines from the first to the last line of ``code``, or None if unknown."""
    import dis

    last = max([line for _, line in dis.findlinestarts(code) if line is not None] or [code.co_firstlineno])
    lines = linecache.getlines(code.co_filename)[code.co_firstlineno - 1 : last]
    return lines or None


def _restore_code(rebuild, args, filename, first, lines):
    """The receiving side of ``code_reduce``: the code object, its file name put back, its lines registered."""
    code = rebuild(*args)
    if code.co_filename != filename:
        code = code.replace(co_filename=filename)
    if lines:
        known = _sources.setdefault(filename, {})
        known.update(zip(range(first, first + len(lines)), lines))
        _publish_source(filename)
    return code


def _publish_source(filename):
    """Put the lines received for ``filename`` into linecache, over the file's own lines if it exists here."""
    known = _sources[filename]
    lines = []
    if not filename.startswith("<") and os.path.isfile(filename):
        lines = linecache.updatecache(filename)  # the file exists here too: unknown lines come from it
    lines = list(lines) + ["\n"] * (max(known) - len(lines))
    for number, text in known.items():
        lines[number - 1] = text
    # mtime None: linecache.checkcache() keeps the entry (there is no file to compare it with)
    linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


class CodeSet(object):
    """Code objects, by identity, held weakly: the functions already described to one receiver."""

    def __init__(self):
        # type: () -> None
        self._refs = {}

    def add(self, code):
        # type: (CodeType) -> bool
        """Add ``code``; return True if it was not there yet."""
        key = id(code)
        ref = self._refs.get(key)
        if ref is not None and ref() is code:
            return False
        import weakref

        self._refs[key] = weakref.ref(code, lambda _, key=key: self._refs.pop(key, None))
        return True

    def clear(self):
        # type: () -> None
        """Forget them all (a pickle that described some was never sent, or the receiver restarted)."""
        self._refs.clear()


class _ModuleNamed(object):
    """Pickles as ``importlib.import_module(name)``: a module of the receiving side."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        import importlib

        return (importlib.import_module, (self.name,))


def loads(frames):
    import pickle

    _cloudpickle()  # make sure cloudpickle's reducers are importable
    if _self and MODULE_NAME not in sys.modules:  # someone removed us: pickles name this module, put it back
        sys.modules[MODULE_NAME] = _self[0]
    return pickle.loads(frames[0], buffers=frames[1:])


# --------------------------------------------------------------------- replies


def _ok(**fields):
    header = {"status": "ok"}
    header.update(fields)
    return header, []


def _error(kind, ename, evalue, tb_text="", frames=None, stack=None):
    header = {"status": "error", "kind": kind, "ename": ename, "evalue": evalue, "traceback": tb_text}
    if stack is not None:
        header["stack"] = stack
    return header, frames or []


def _user_traceback(exc):
    """Format ``exc`` without the agent's own frames: the user sees their code only."""
    _republish_sources(exc)
    return "".join(traceback.format_exception(type(exc), exc, _user_frames(exc.__traceback__)))


def _user_frames(tb):
    """``tb`` from its first frame that is not the agent's."""
    while tb is not None and tb.tb_frame.f_code.co_filename == AGENT_FILENAME:
        tb = tb.tb_next
    return tb


MAX_STACK_FRAMES = 200  # frames of one exception sent as data (the first and last ones); the text has them all


def _stack(exc):
    """The traceback of ``exc`` as data, for hosts that render it themselves (see RemoteTraceback.stack).

    One dict per exception of its chain, oldest first: ``type`` (as traceback prints it), ``message``,
    ``only`` (its format_exception_only lines), ``frames`` ([file, line, function, source line], the
    agent's own left out) and ``link`` (how it follows the previous, older one: "cause", "context" or None).
    """
    chain = []
    seen = set()
    link = None
    while exc is not None and id(exc) not in seen and len(chain) < 20:
        seen.add(id(exc))
        frames = [
            [frame.filename, frame.lineno, frame.name, frame.line or ""]
            for frame in traceback.extract_tb(exc.__traceback__)
            if frame.filename != AGENT_FILENAME
        ]
        if len(frames) > MAX_STACK_FRAMES:
            frames = frames[: MAX_STACK_FRAMES // 2] + frames[-MAX_STACK_FRAMES // 2 :]
        cls = type(exc)
        name = cls.__qualname__
        if cls.__module__ not in ("builtins", "__main__"):
            name = "%s.%s" % (cls.__module__, name)
        try:
            message = str(exc)
        except BaseException:
            message = "<exception str() failed>"
        only = traceback.format_exception_only(cls, exc)
        chain.append({"type": name, "message": message, "only": only, "frames": frames, "link": None})
        if exc.__cause__ is not None:
            exc, link = exc.__cause__, "cause"
        elif exc.__context__ is not None and not exc.__suppress_context__:
            exc, link = exc.__context__, "context"
        else:
            break
        chain[-1]["link"] = link
    chain.reverse()
    return chain


def _republish_sources(exc):
    """Make sure linecache has the received source of every frame of ``exc`` (and of its chain)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        tb = exc.__traceback__
        while tb is not None:
            filename = tb.tb_frame.f_code.co_filename
            if filename in _sources and filename not in linecache.cache:
                _publish_source(filename)
            tb = tb.tb_next
        exc = exc.__cause__ or exc.__context__


def _exception_reply(exc, kind="exception"):
    tb_text = _user_traceback(exc)
    frames = []
    stack = None
    if kind == "exception":
        try:
            frames = dumps(exc)
        except BaseException:  # the host falls back to RemoteError
            frames = []
        try:
            stack = _stack(exc)
        except Exception:  # the text traceback is there anyway
            stack = None
    return _error(kind, type(exc).__name__, str(exc), tb_text, frames, stack)


# What to do instead when a value cannot be pickled, by the request that wanted it.
KEEP_ADVICE = {
    "call": "keep it in the kernel instead: call_ref() returns a RemoteRef to it, whose methods run there",
    "pull": "keep it in the kernel instead: ref(name) returns a RemoteRef to it, whose methods run there",
    "eval": "keep it in the kernel instead: assign it there with exec() and take ref(name), a RemoteRef to it",
    "ref_eval": (
        "keep it in the kernel instead: ref.call_ref('method', ...) keeps a method's result there, "
        "and the ref itself stands for the object in calls"
    ),
}


def _value_reply(value, op="call"):
    try:
        frames = dumps(value)
    except BaseException as exc:
        what = "the result" if op in ("call", "ref_eval") else "the value"
        return _error(
            "serialize",
            type(exc).__name__,
            "%s (a %s) could not be pickled in the kernel: %s; %s"
            % (what, _type_name(value), exc, KEEP_ADVICE.get(op, KEEP_ADVICE["call"])),
            _user_traceback(exc),
            _pickled_error(exc),
        )
    header, _ = _ok()
    return header, frames


def _pickled_error(exc):
    """``exc`` pickled, for the host to chain as a cause; [] if it cannot travel."""
    try:
        return dumps(exc)
    except BaseException:
        return []


# --------------------------------------------------------------------- interrupts

_sigints = [0]  # SIGINTs received while a request ran (by _on_sigint)


def _on_sigint(signum, frame):
    """Python's default SIGINT handler, counting: an interrupt tells itself from ``raise KeyboardInterrupt``."""
    _sigints[0] += 1
    raise KeyboardInterrupt


def _watch_sigint():
    """Count SIGINTs during a request; return the handler to put back, or None where we cannot (not the main
    thread, or the kernel has its own handler): then every KeyboardInterrupt counts as an interrupt."""
    try:
        import signal

        previous = signal.getsignal(signal.SIGINT)
        if previous is not signal.default_int_handler:  # ipykernel installs it while it handles a request
            return None
        signal.signal(signal.SIGINT, _on_sigint)
        return previous
    except Exception:
        return None


def _unwatch_sigint(previous):
    if previous is not None:
        try:
            import signal

            if signal.getsignal(signal.SIGINT) is _on_sigint:
                signal.signal(signal.SIGINT, previous)
        except Exception:
            pass


def _type_name(value):
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else "%s.%s" % (cls.__module__, cls.__qualname__)


# --------------------------------------------------------------------- handlers


class _RequestUnpicklingError(Exception):
    missing = None  # {"module", "package", "version"}: the module the pickle named and this side's view of it


def _load_request(frames):
    try:
        return loads(frames)
    except _StaleRef:
        raise
    except BaseException as exc:
        error = _RequestUnpicklingError("%s: %s" % (type(exc).__name__, exc))
        error.missing = missing_module(exc)
        raise error from exc


def missing_module(exc):
    """For an unpickling error that names a module, ``{"module", "package", "version"}``, else None.

    ``package`` is the module's top-level package and ``version`` its version
    on this side (``package_version``). Both sides use it: the host to say
    which versions differ.
    """
    module = None
    if isinstance(exc, ImportError):
        module = exc.name
    elif isinstance(exc, AttributeError):  # pickle: "Can't get attribute 'X' on <module 'm' from ...>"
        import re

        found = re.search(r"on <module '([^']+)'", str(exc))
        module = found.group(1) if found else None
    if not isinstance(module, str) or not module or module.startswith("."):
        return None
    package = module.split(".")[0]
    return {"module": module, "package": package, "version": package_version(package)}


def package_version(package):
    """The version of a top-level package importable here; "" if it has none; None if it cannot be imported."""
    import importlib

    try:
        imported = importlib.import_module(package)
    except BaseException:
        return None
    version = getattr(imported, "__version__", None)
    if isinstance(version, str):
        return version
    try:
        from importlib import metadata

        return metadata.version(package)
    except Exception:
        return ""


def _compile(source, mode):
    """Compile with a unique file name registered in linecache, so tracebacks show the source."""
    _exec_counter[0] += 1
    filename = "<kernelproxy-%s-%d>" % (mode, _exec_counter[0])
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    stale = "<kernelproxy-%s-%d>" % (mode, _exec_counter[0] - 100)
    linecache.cache.pop(stale, None)  # keep a bounded history of sources
    return compile(source, filename, mode)


def _op_call(header, frames, ns):
    fn, args, kwargs = _load_request(frames)
    result = fn(*args, **kwargs)
    return _keep(result) if header.get("keep") else _value_reply(result, "call")


def _op_push(header, frames, ns):
    ns.update(_load_request(frames))
    return _ok()


def _op_pull(header, frames, ns):
    names = header["names"]
    missing = [name for name in names if name not in ns]
    if missing:
        raise KeyError("not defined in the kernel: %s" % ", ".join(missing))
    return _value_reply(tuple(ns[name] for name in names), "pull")


def _op_exec(header, frames, ns):
    exec(_compile(header["code"], "exec"), ns)
    return _ok()


def _op_eval(header, frames, ns):
    return _value_reply(eval(_compile(header["expr"], "eval"), ns), "eval")


def _op_delete(header, frames, ns):
    names = header["names"]
    missing = [name for name in names if name not in ns]
    if missing:
        raise KeyError("not defined in the kernel: %s" % ", ".join(missing))
    for name in names:
        del ns[name]
    return _ok()


def _op_contains(header, frames, ns):
    return _ok(result=header["name"] in ns)


_objects = {}  # id -> object the host holds a RemoteRef to
_next_object_id = [0]


def _keep(value):
    """Keep ``value`` for the host; return the reply describing the new reference."""
    _next_object_id[0] += 1
    _objects[_next_object_id[0]] = value
    try:
        text = repr(value)
    except BaseException as exc:
        text = "<repr failed: %s>" % type(exc).__name__
    if len(text) > 200:
        text = text[:197] + "..."
    return _ok(ref={"id": _next_object_id[0], "type": _type_name(value), "repr": text, "agent": _instance[0]})


class _StaleRef(LookupError):
    """A RemoteRef made by another agent instance: the kernel restarted since, and its object is gone."""


def _check_instance(instance, object_id):
    """Refuse a ref minted by another instance of the agent (another kernel process): ids start over there."""
    if instance is not None and instance != _instance[0]:
        raise _StaleRef(
            "RemoteRef #%d points into a kernel process that is gone (the kernel restarted since): its object "
            "no longer exists, and id %d may now be another client's object" % (object_id, object_id)
        )


def resolve(object_id, path=(), instance=None):
    """The object a RemoteRef stands for: its kept root, then each step of its path.

    ``instance`` is the agent instance that kept it (None from older hosts: not checked).
    """
    _check_instance(instance, object_id)
    try:
        target = _objects[object_id]
    except KeyError:
        raise LookupError(
            "no kept object %d in this kernel: it was released, or the kernel restarted" % object_id
        ) from None
    import operator

    for step in path:
        kind = step[0]
        if kind == "getattr":
            target = getattr(target, step[1])
        elif kind == "getitem":
            target = target[step[1]]
        elif kind == "call":
            target = target(*step[1], **step[2])
        elif kind == "op":  # an operator module function, or len
            function = len if step[1] == "len" else getattr(operator, step[1])
            target = function(target, *step[2])
        else:
            raise ValueError("unknown path step %r (protocol corruption or version mismatch?)" % (kind,))
    return target


def _op_ref_name(header, frames, ns):
    name = header["name"]
    if name not in ns:
        raise KeyError("not defined in the kernel: %s" % name)
    return _keep(ns[name])


def _op_ref_eval(header, frames, ns):
    _check_instance(header.get("agent"), header["root"])
    value = resolve(header["root"], _load_request(frames) if frames else ())
    return _keep(value) if header.get("keep") else _value_reply(value, "ref_eval")


def _op_release(header, frames, ns):
    instance = header.get("agent")
    if instance is not None and instance != _instance[0]:  # stale: never free another client's objects
        return _ok(alive=len(_objects), ignored=len(header["ids"]))
    for object_id in header["ids"]:
        _objects.pop(object_id, None)
    return _ok(alive=len(_objects))


def _op_cell(header, frames, ns):
    """Run a notebook cell's code as IPython runs cells (magics, the last expression displayed): %%remote.

    Not stored in the kernel's history. The last expression's value goes out
    as an execute_result, like any cell's. An error raises here, without
    IPython's own frames, and is re-raised on the host.
    """
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    if shell is None:  # not an IPython kernel: plain Python statements
        exec(_compile(header["code"], "exec"), ns)
        return _ok()
    result = shell.run_cell(header["code"], store_history=False, silent=False)
    error = result.error_before_exec or result.error_in_exec
    if error is not None:
        tb = error.__traceback__
        while tb is not None and str(tb.tb_frame.f_globals.get("__name__", "")).startswith("IPython."):
            tb = tb.tb_next
        raise error.with_traceback(tb)
    return _ok()


def _op_echo(header, frames, ns):
    """Return the frames as received: transports use it to prove binary buffers survive the path."""
    return _ok()[0], list(frames)


HANDLERS = {
    "call": _op_call,
    "push": _op_push,
    "pull": _op_pull,
    "exec": _op_exec,
    "eval": _op_eval,
    "delete": _op_delete,
    "contains": _op_contains,
    "echo": _op_echo,
    "ref_name": _op_ref_name,
    "ref_eval": _op_ref_eval,
    "release": _op_release,
    "cell": _op_cell,
}


# Header fields each op needs, and their types: a request that lacks them is malformed, not a user error.
# A field's spec is a type, or (list, item type).
_FIELDS = {
    "pull": {"names": (list, str)},
    "exec": {"code": str},
    "eval": {"expr": str},
    "cell": {"code": str},
    "delete": {"names": (list, str)},
    "contains": {"name": str},
    "ref_name": {"name": str},
    "ref_eval": {"root": int},
    "release": {"ids": (list, int)},
}


def _conforms(value, spec):
    if isinstance(spec, tuple):
        return isinstance(value, spec[0]) and all(isinstance(item, spec[1]) for item in value)
    return isinstance(value, spec)


def _malformed(header):
    """Why ``header`` is not a request this agent understands, or None if it is one."""
    if not isinstance(header, dict) or not isinstance(header.get("op"), str) or header["op"] not in HANDLERS:
        op = header.get("op") if isinstance(header, dict) else header
        return "unknown request %r (protocol corruption or version mismatch? agent protocol %d)" % (op, PROTOCOL)
    for field, spec in _FIELDS.get(header["op"], {}).items():
        if not _conforms(header.get(field), spec):
            return "request %r has no valid field %r" % (header["op"], field)
    return None


def dispatch(header, frames, ns, rid=None):
    """Run one request; always return a reply, never raise (the kernel must survive any input).

    With a request id ``rid``, ``cancel(rid)`` from another thread can stop it (see ``cancel``).
    """
    watched = _watch_sigint()
    sigints = _sigints[0]
    try:
        problem = _malformed(header)
        if problem is not None:
            return _error("protocol", "ProtocolError", problem)
        if rid is None:
            return HANDLERS[header["op"]](header, frames, ns)
        return _cancellable(rid, HANDLERS[header["op"]], header, frames, ns)
    except _StaleRef as exc:
        return _error("stale", "StaleRefError", str(exc))
    except _RequestUnpicklingError as exc:
        reply, out = _error(
            "deserialize", "SerializationError", str(exc), _user_traceback(exc), _pickled_error(exc.__cause__)
        )
        if exc.missing is not None:
            reply["missing"] = exc.missing
        return reply, out
    except KeyboardInterrupt as exc:
        if watched is not None and _sigints[0] == sigints:  # no SIGINT came: the code raised it itself
            return _exception_reply(exc)
        return _exception_reply(exc, kind="interrupted")
    except BaseException as exc:  # SystemExit too: user code must not end the kernel through us
        return _exception_reply(exc)
    finally:
        _unwatch_sigint(watched)


# --------------------------------------------------------------------- request ids: resends, kept replies, cancel

_instance = [None]  # this agent's instance id, made at install: a new one in each kernel process (refs carry it)
HANDLED_MAX = 4096  # request ids remembered (a resend of one of them is answered, never run again)
KEPT_MAX_BYTES = 64 * 1024 * 1024  # replies kept for resends (the newest is kept whatever its size)
_handled = {}  # rid -> True, oldest first: requests this agent has run
_kept = {}  # rid -> (reply, size): replies kept until the host acknowledges them (wires that may lose them)
_kept_bytes = [0]
_store_lock = threading.Lock()  # the main shell and subshells use the store at once
_active = {}  # rid -> ident of the thread running it, while it runs
_cancelled = set()  # rids cancel() sent an exception to
_active_lock = threading.Lock()


def _recall(rid):
    """(True, kept reply or None) if the request ``rid`` has run here, else (False, None)."""
    with _store_lock:
        if rid not in _handled:
            return False, None
        kept = _kept.get(rid)
        return True, (kept[0] if kept is not None else None)


def _remember(rid, reply, size, keep):
    """Record that ``rid`` ran; with ``keep``, keep its reply until acknowledged (bounded)."""
    with _store_lock:
        _handled[rid] = True
        while len(_handled) > HANDLED_MAX:
            old = next(iter(_handled))
            del _handled[old]
            _forget_kept(old)
        if keep:
            _kept[rid] = (reply, size)
            _kept_bytes[0] += size
            while _kept_bytes[0] > KEPT_MAX_BYTES and len(_kept) > 1:
                _forget_kept(next(iter(_kept)))


def _forget_kept(rid):
    kept = _kept.pop(rid, None)
    if kept is not None:
        _kept_bytes[0] -= kept[1]


def _acknowledge(rids):
    """The host has these replies: drop them."""
    if isinstance(rids, list):
        with _store_lock:
            for rid in rids:
                if isinstance(rid, str):
                    _forget_kept(rid)


def _lost_reply():
    return _error(
        "lost",
        "ReplyLost",
        "the kernel ran this request, but its reply was lost on the way and is no longer kept here",
    )


def _cancellable(rid, function, *args):
    """Run ``function(*args)`` so that ``cancel(rid)`` from another thread can stop it."""
    ident = threading.get_ident()
    with _active_lock:
        _active[rid] = ident
    try:
        return function(*args)
    finally:
        with _active_lock:
            _active.pop(rid, None)
            if rid in _cancelled:  # a cancel that came as it finished must not hit what this thread runs next
                _cancelled.discard(rid)
                _set_async_exc(ident, None)


def _set_async_exc(ident, exc):
    import ctypes

    return ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(ident), ctypes.py_object(exc) if exc is not None else None
    )


def cancel(rid):
    """Stop the request ``rid`` running in another thread (a subshell's) by raising KeyboardInterrupt there.

    The exception is raised when that thread next runs Python bytecode: code
    in C (``time.sleep``, a lock, I/O, a long numpy operation) is not stopped
    until it returns. The main thread's requests are not stopped this way
    (SIGINT does that). Returns a Bundle ``{"cancelled": bool, "reason": str}``.
    """
    with _active_lock:
        ident = _active.get(rid)
        if ident is None:
            reason = "not running"
        elif ident == threading.main_thread().ident:
            ident, reason = None, "runs on the main thread"
        else:
            _cancelled.add(rid)
            reason = "" if _set_async_exc(ident, KeyboardInterrupt) == 1 else "thread not found"
    return Bundle({"cancelled": ident is not None and not reason, "reason": reason})


def once(rid, keep, ack, function, *args):
    """Execute-transport requests with an id: run ``function(*args)`` once; a resend gets the kept answer.

    ``keep``: keep the answer (a Bundle) until acknowledged; ``ack``: ids whose answers the host has.
    """
    _acknowledge(ack)
    seen, kept = _recall(rid)
    if seen:
        return kept if kept is not None else Bundle(_lost_reply()[0])
    result = function(*args)
    payload = result.payload if isinstance(result, Bundle) else None
    size = 256
    if isinstance(payload, dict):
        size += sum(len(text) for text in payload.get("frames", ()) if isinstance(text, str))
        size += len(payload.get("data", "")) if isinstance(payload.get("data"), str) else 0
    _remember(rid, result, size, keep)
    return result


def _subshells_supported():
    try:
        kernel = sys.modules["IPython"].get_ipython().kernel
        return bool(getattr(kernel, "_supports_kernel_subshells", False))
    except Exception:
        return False



# --------------------------------------------------------------------- install

_self = []  # type: list  # this module, once installed (comms keep running it if someone removes it from sys.modules)
# State that outlives an upgrade: other clients' kept objects and transfers in flight.
_SHARED_STATE = (
    "_exec_counter",
    "_uploads",
    "_parts",
    "_outbox",
    "_objects",
    "_next_object_id",
    "_sources",
    "_instance",
    "_handled",
    "_kept",
    "_kept_bytes",
    "_store_lock",
)


def _install(module):
    """Make ``module`` (this file, just executed) the agent, taking over an older revision's state.

    The state is shared, not copied: comms opened through the older revision
    keep running its code on the same objects.
    """
    older = sys.modules.get(MODULE_NAME)
    if older is not None:
        for name in _SHARED_STATE:
            if hasattr(older, name):
                setattr(module, name, getattr(older, name))
    if module._instance[0] is None:  # a new kernel process (or an upgrade from a revision without one)
        module._instance[0] = binascii.hexlify(os.urandom(8)).decode("ascii")
    sys.modules[MODULE_NAME] = module
    module._self[:] = [module]
    return module


# --------------------------------------------------------------------- handshake


def hello(probe=None):
    """Describe this kernel for the host's version checks (JSON only: works without cloudpickle)."""
    try:
        cloudpickle_version = _cloudpickle().__version__
        cloudpickle_error = None
    except BaseException as exc:
        cloudpickle_version = None
        cloudpickle_error = "%s: %s" % (type(exc).__name__, exc)
    return Bundle(
        {
            "status": "ok",
            "protocol": PROTOCOL,
            "revision": REVISION,
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "executable": sys.executable,
            "pid": os.getpid(),
            "hostname": platform.node(),
            "cloudpickle": cloudpickle_version,
            "cloudpickle_error": cloudpickle_error,
            # The host sent `probe` inside the request content too; if we can read it back
            # from the parent message, frames may travel there instead of as literals.
            "parent_access": probe is not None and _content_field() == probe,
            "comms": listen(),
            "instance": _instance[0],
            "subshells": _subshells_supported(),
        }
    )


# --------------------------------------------------------------------- execute transport


class Bundle:
    """A reply as a display bundle: IPython formats user_expressions results through it."""

    __slots__ = ("payload",)

    def __init__(self, payload):
        self.payload = payload

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {MIME: self.payload}

    def __repr__(self):
        return "<kernelproxy reply>"


def _content_field():
    """Read CONTENT_KEY from the execute_request being handled (ipykernel >= 6)."""
    try:
        kernel = sys.modules["IPython"].get_ipython().kernel
        return kernel.get_parent("shell")["content"].get(CONTENT_KEY)
    except Exception:  # not an ipykernel: the host then sends frames as literals
        return None


def _decode(text):
    return bytearray(_b64decode(text))  # bytearray: values built on it stay writable


def _encode(buf):
    return _b64encode(buf).decode("ascii")


def ex(ns, header_json, frames=None, inline_limit=0, tid=None, rid=None):
    """Execute-transport entry point: run one request, return a Bundle.

    ``frames`` is a list of base64 strings, the id of a finished upload (str),
    or None to read the base64 list from the request content.
    Replies larger than ``inline_limit`` bytes are parked in the outbox under
    ``tid`` for the host to fetch with get(). ``rid``: the request's id, for
    ``cancel``. The reply names this agent's instance (``agent``), so the host
    sees that the kernel restarted since its last request.
    """
    try:
        if frames is None:
            frames = _content_field()
            if frames is None:
                raise ValueError("request frames missing from the execute_request content")
        if isinstance(frames, str):
            frames = _uploads.pop(frames)
        else:
            frames = [_decode(text) for text in frames]
        header = json.loads(header_json)
    except BaseException as exc:
        return Bundle(_error("protocol", type(exc).__name__, "malformed request: %s" % exc)[0])
    reply, out = dispatch(header, frames, ns, rid)
    reply["agent"] = _instance[0]
    sizes = [memoryview(frame).nbytes for frame in out]
    if sum(sizes) > inline_limit and tid is not None:
        _outbox[tid] = [memoryview(frame).cast("B") for frame in out]
        reply["tid"] = tid
        reply["sizes"] = sizes
    else:
        reply["frames"] = [_encode(frame) for frame in out]
    return Bundle(reply)


def alloc(tid, sizes):
    """Start an upload of frames of the given sizes."""
    _uploads[tid] = [bytearray(size) for size in sizes]


def put(tid, index, offset, text=None):
    """Write one base64 chunk (argument, or request content when None) into an upload."""
    if text is None:
        text = _content_field()
    data = _b64decode(text)
    frame = _uploads[tid][index]
    if offset < 0 or offset + len(data) > len(frame):
        raise ValueError(
            "chunk [%d, %d) outside frame %d of %d bytes" % (offset, offset + len(data), index, len(frame))
        )
    frame[offset : offset + len(data)] = data


def get(tid, index, offset, size, last=False):
    """Fetch one chunk of a parked reply as base64; the host's last get() frees the reply."""
    data = _encode(_outbox[tid][index][offset : offset + size])
    if last:
        free(tid)
    return Bundle({"data": data})


def free(tid):
    """Forget a transfer (finished, abandoned or failed)."""
    _uploads.pop(tid, None)
    _outbox.pop(tid, None)


# --------------------------------------------------------------------- comm transport


def _blake3(frames):
    import blake3

    hasher = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for frame in frames:
        hasher.update(frame)
    return hasher.hexdigest()


def _sha256(frames):
    import hashlib

    hasher = hashlib.sha256()
    for frame in frames:
        hasher.update(frame)
    return hasher.hexdigest()


DIGESTS = {"blake3": _blake3, "sha256": _sha256}  # the comm transport's buffer digests, best first


def digest_available(name):
    if name == "blake3":
        try:
            import blake3  # noqa: F401 - optional, a fast multi-threaded hash
        except ImportError:
            return False
    return name in DIGESTS


# --------------------------------------------------------------------- parts: frames bigger than a message


def split_parts(frames, part_size):
    """Cut ``frames`` into pieces of at most ``part_size`` bytes: yield (fields, piece) for each part message.

    ``fields`` (``index``, ``offset``, ``sizes``) say where the piece goes; ``PartsAssembly`` puts them back.
    """
    sizes = [memoryview(frame).nbytes for frame in frames]
    for index, frame in enumerate(frames):
        view = memoryview(frame).cast("B")
        for offset in range(0, max(len(view), 1), part_size):
            yield {"index": index, "offset": offset, "sizes": sizes}, view[offset : offset + part_size]


class PartsAssembly(object):
    """The frames of one message sent in parts, rebuilt as the parts arrive (either side)."""

    def __init__(self):
        self.frames = None  # bytearrays, made at the first part

    def add(self, fields, buffers):
        """Put one part in place; raise ValueError if it does not fit (a malformed or hostile part)."""
        try:
            (buffer,) = buffers
            if self.frames is None:
                self.frames = [bytearray(size) for size in fields["sizes"]]
            frame, offset, data = self.frames[fields["index"]], fields["offset"], memoryview(buffer).cast("B")
            if not 0 <= offset <= len(frame) - len(data):
                raise ValueError("part [%d, %d) outside a frame of %d bytes" % (offset, offset + len(data), len(frame)))
            frame[offset : offset + len(data)] = data
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise ValueError("%s: %s" % (type(exc).__name__, exc)) from exc


def listen():
    """Register the comm target (idempotent); return True if this kernel has comms."""
    try:
        kernel = sys.modules["IPython"].get_ipython().kernel
        kernel.comm_manager.register_target(COMM_TARGET, _on_comm_open)
        return True
    except Exception:
        return False


def _on_comm_open(comm, open_msg):
    options = open_msg["content"]["data"]
    offered = options.get("digests", [])
    algorithm = next((name for name in offered if digest_available(name)), None)
    if algorithm is None:
        comm.close({"error": "no common digest algorithm among %r" % (offered,)})
        return
    digest = DIGESTS[algorithm]
    part_size = options.get("part_size")  # the host's wire limits message size: big replies go in parts
    send = _shell_sender(comm) if options.get("reply_on") == "shell" else None
    reply_on = "shell" if send is not None else "iopub"
    if send is None:
        send = lambda data, buffers=None: comm.send(data, buffers=buffers)  # noqa: E731

    def on_msg(msg):
        rid = None
        try:
            content = msg.get("content") if isinstance(msg, dict) else None
            data = content.get("data") if isinstance(content, dict) else None
            frames = list(msg.get("buffers") or [])
            if isinstance(data, dict) and "part" in data:
                _receive_part(data["part"], frames)
                return  # parts are not answered: the request that follows them is
            if isinstance(data, dict):
                _acknowledge(data.get("ack"))
                rid = data.get("rid") if isinstance(data.get("rid"), str) else None
            missing = ""
            if isinstance(data, dict) and "upload" in data:
                frames = _take_upload(data["upload"])
                if frames is None:
                    frames, missing = [], " (its parts did not all arrive)"
            if rid is not None:
                seen, kept = _recall(rid)
                if seen:  # a resend (the host lost the reply): answer again, never run it twice
                    reply, out = kept if kept is not None else _lost_reply()
                    _send_reply(reply, out)
                    return
            if not isinstance(data, dict) or missing or data.get("digest") != digest(frames):
                reply, out = _error(
                    "protocol",
                    "ProtocolError",
                    "the request's binary buffers do not match its signed digest%s; refused" % missing,
                )
            else:
                user_ns = sys.modules["IPython"].get_ipython().user_ns
                reply, out = dispatch(data.get("header"), frames, user_ns, rid)
        except BaseException as exc:  # malformed beyond reading: still answer, never leave the host waiting
            reply, out = _error("protocol", type(exc).__name__, "malformed request: %s" % exc)
        if rid is not None:
            size = 256 + sum(memoryview(frame).nbytes for frame in out)
            _remember(rid, (reply, out), size, bool(data.get("keep_reply")))
        _send_reply(reply, out)

    def _send_reply(reply, out):
        _flush_output()  # the call's output goes out on IOPub before the reply: the host needs no 'idle'
        final = {"header": reply, "digest": digest(out)}
        if part_size and sum(memoryview(frame).nbytes for frame in out) > part_size:
            _send_parts(send, out, part_size)
            final["parts"] = len(out)
            out = []
        send(final, out)

    comm.on_msg(on_msg)
    send({"opened": algorithm, "reply_on": reply_on})


def _flush_output():
    """Publish what the call printed now (ipykernel's flush() returns once its IOPub thread sent it).

    A flush waits for that thread (~0.3 ms), so only streams with output pending are flushed.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            if getattr(stream, "_flush_pending", True):
                stream.flush()
        except Exception:
            pass


def _receive_part(part, buffers):
    """Put one part of a request's frames in place (the host sends them ahead of the request).

    Parts are never answered. A part that cannot be placed drops its upload, so the request
    that follows is refused with a clear error instead of running on half-filled frames.
    """
    upload = part.get("upload") if isinstance(part, dict) else None
    try:
        if part.get("abort"):
            _take_upload(upload)
            return
        assembly = _parts.get(upload)
        if assembly is None:
            assembly = _parts[upload] = PartsAssembly()
        assembly.add(part, buffers)
    except Exception:
        _take_upload(upload)


def _take_upload(upload):
    """Remove and return an upload's frames; None if there is no such upload."""
    try:
        assembly = _parts.pop(upload, None)
    except TypeError:  # an unhashable id from a malformed message
        return None
    return assembly.frames if assembly is not None else None


def _send_parts(send, frames, part_size):
    for fields, piece in split_parts(frames, part_size):
        send({"part": fields}, [piece])


def _shell_sender(comm):
    """A send() for comm replies on the shell channel, to the requester only; None where we cannot.

    Replies then reach only the client that asked, and Jupyter Server does not
    throttle them (it drops IOPub messages past 1,000 a second). Uses ipykernel's
    reply routing (its parent identity and reply socket), as its own replies do;
    with subshells (ipykernel >= 7), the socket of the (sub)shell that runs the request.
    """
    try:
        kernel = sys.modules["IPython"].get_ipython().kernel
        subshells = getattr(kernel, "_supports_kernel_subshells", False)
        if subshells:
            manager = kernel.shell_channel_thread.manager
            stream = manager.get_subshell_to_shell_channel_socket(None)
        else:
            stream = kernel.shell_stream
        kernel._parent_ident["shell"]  # noqa: B018 - present in ipykernel >= 6
        if stream is None:
            return None
    except Exception:
        return None

    def send(data, buffers=None):
        parent = kernel.get_parent("shell")
        ident = kernel._parent_ident["shell"]
        socket = stream
        if subshells:
            socket = manager.get_subshell_to_shell_channel_socket(parent.get("header", {}).get("subshell_id"))
        content = {"comm_id": comm.comm_id, "data": data}
        kernel.session.send(socket, "comm_msg", content, parent=parent, ident=ident, buffers=buffers)

    return send
