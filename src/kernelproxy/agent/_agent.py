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

Any request may carry ``define: [digest, ...]``: its first frames (one per
digest, before the frames above) are pickles of functions the host sends by
value, kept here by digest in a bounded cache (``FUNCTION_CACHE_ENTRIES``,
``FUNCTION_CACHE_BYTES``, least recently used out first). A pickle names such
a function as ``_cached_function(digest)``; if the kernel does not have it
(restarted, evicted) the reply is an error of kind ``undefined`` with
``undefined: [digest]`` and nothing ran: the host sends the request again with
the definition.

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
  longer kept), ``undefined`` (see ``define``), ``cancelled`` (the lane: the
  host gave the request up before it started) or ``protocol`` (malformed
  request: corruption or a version mismatch). An ``exception`` reply also has
  ``stack``: the traceback as data (see ``_stack``), for hosts that render it
  themselves. A ``deserialize`` reply whose pickle named a module it could not
  find has ``missing``: ``{"module", "package", "version"}``, the package's
  version here (None: not importable), so the host can tell a missing package
  from a version difference. For ``deserialize`` and ``serialize``, frames, if
  present, are the pickled original error (a ``ModuleNotFoundError``...).

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

The lane (kernels on the host's machine): ``lane_listen(path, token)``, run
from the kernel's main thread through an execute request, listens on a Unix
socket at ``path`` (mode 0600, in the host's private directory) and serves it
from the main thread's event loop, between ipykernel's own handlers; one
connection, from the same user, that says ``token`` first. Requests and
replies are the header and frames above in the lane's own framing (see the
lane section below), big frames in shared memory; output a request causes
(whatever ipykernel would publish on IOPub with it as parent) goes over the
lane to its caller, before its reply.
"""

import binascii
import json
import linecache
import os
import platform
import sys
import threading
import traceback
from types import CodeType, TracebackType

PROTOCOL = 1
# Raised at every change of this file (a test holds the hash of each revision's source): a kernel that has
# an older revision installed (a long-lived kernel, used by an older kernelproxy) gets this one in its place.
REVISION = 14
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
    Small values of plain types take the standard pickler (a tenth of the cost:
    no cloudpickle Pickler to set up); they pickle the same way there.
    """
    if _plain(value, 2):
        import pickle

        return [memoryview(pickle.dumps(value, protocol=5))]
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


# Types the standard pickler handles as cloudpickle would (no functions or classes by value, no big buffers).
PLAIN_TYPES = {int, float, complex, bool, type(None), type(Ellipsis)}
_PLAIN_SIZED = (str, bytes)
_PLAIN_CONTAINERS = (tuple, list, dict)


def _plain(value, depth):
    """Whether ``value`` is small and made of plain types only (containers up to ``depth`` levels, 32 items)."""
    kind = type(value)
    if kind in PLAIN_TYPES:
        return True
    if kind in _PLAIN_SIZED:
        return len(value) < 4096
    if depth and kind in _PLAIN_CONTAINERS and len(value) <= 32:
        if kind is dict:
            return all(_plain(key, 0) and _plain(item, depth - 1) for key, item in value.items())
        return all(_plain(item, depth - 1) for item in value)
    return False


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
    kinds = list(map(type, items))  # and count(str): 2/3 of the time a set of the types takes
    holes = values = ()
    if kinds.count(str) != len(items):
        holes = [index for index, kind in enumerate(kinds) if kind is not str]
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
    import itertools

    import numpy

    view = memoryview(data)
    pieces = []
    start = 0
    for end in ends:
        pieces.append(str(view[start:end], "utf-8", "surrogatepass").split("\0"))
        start = end
    items = itertools.chain.from_iterable(pieces)
    try:  # fromiter: no list of them all, and no probing each one for nesting as numpy.array does
        flat = numpy.fromiter(items, dtype=object, count=sum(map(len, pieces)))
    except ValueError:  # numpy < 1.23 makes no object arrays from iterators
        flat = numpy.array(list(itertools.chain.from_iterable(pieces)), dtype=object)
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
    """``tb`` without the agent's own frames: those before the user's code (the request's dispatch) and those
    after it (the SIGINT handler that raised KeyboardInterrupt in it)."""
    kept = []
    while tb is not None:
        if tb.tb_frame.f_code.co_filename != AGENT_FILENAME:
            kept.append(tb)
        tb = tb.tb_next
    rebuilt = None
    for entry in reversed(kept):
        rebuilt = TracebackType(rebuilt, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return rebuilt


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
    if kind == "interrupted" and _user_frames(exc.__traceback__) is None:
        tb_text = ""  # no frame of the caller's code to show where it stopped (a C function was called)
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
        import _signal  # not signal: its wrappers turn handlers into enums, a cost paid twice per request

        previous = _signal.getsignal(_signal.SIGINT)
        if previous is _lane_sigint:  # a lane request: that handler counts the SIGINTs it turns into interrupts
            return previous
        if previous is not _signal.default_int_handler:  # ipykernel installs it while it handles a request
            return None
        _signal.signal(_signal.SIGINT, _on_sigint)
        return previous
    except Exception:
        return None


def _unwatch_sigint(previous):
    if previous is not None:
        try:
            import _signal

            if _signal.getsignal(_signal.SIGINT) is _on_sigint:
                _signal.signal(_signal.SIGINT, previous)
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
    except (_StaleRef, _FunctionMissing, KeyboardInterrupt):  # an interrupt while loading is an interrupt
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


# --------------------------------------------------------------------- functions sent once

FUNCTION_CACHE_ENTRIES = 1024  # functions kept by content hash; the least recently used go first
FUNCTION_CACHE_BYTES = 64 << 20  # and at most this many bytes of their pickles
_functions = {}  # digest -> (function, pickle size), in order of use (dicts keep insertion order)
_function_bytes = [0]


class _FunctionMissing(Exception):
    """A request names a function by digest that this kernel does not have (restarted, or evicted)."""

    def __init__(self, digest):
        Exception.__init__(self, digest)
        self.digest = digest


def _cached_function(digest):
    """A function the host sent earlier (``define``), named by the digest of its pickle."""
    try:
        entry = _functions.pop(digest)
    except KeyError:
        raise _FunctionMissing(digest) from None
    _functions[digest] = entry  # most recently used last
    return entry[0]


def _define(digests, frames):
    """Unpickle and keep the functions a request defines (its first frames, one each, in order)."""
    for digest in digests:
        payload = frames.pop(0)
        if digest in _functions:
            continue
        fn = _load_request([payload])
        size = memoryview(payload).nbytes
        _functions[digest] = (fn, size)
        _function_bytes[0] += size
        while len(_functions) > FUNCTION_CACHE_ENTRIES or _function_bytes[0] > FUNCTION_CACHE_BYTES:
            oldest = next(iter(_functions))
            _function_bytes[0] -= _functions.pop(oldest)[1]


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
    if "define" in header and not _conforms(header["define"], (list, str)):
        return "request %r has no valid field 'define'" % header["op"]
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
        if header.get("define"):
            frames = list(frames)
            _define(header["define"], frames)
        if rid is None:
            return HANDLERS[header["op"]](header, frames, ns)
        return _cancellable(rid, HANDLERS[header["op"]], header, frames, ns)
    except _StaleRef as exc:
        return _error("stale", "StaleRefError", str(exc))
    except _FunctionMissing as exc:
        reply, out = _error("undefined", "FunctionMissing", "the kernel does not have function %s" % exc.digest)
        reply["undefined"] = [exc.digest]
        return reply, out
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
    "_functions",
    "_function_bytes",
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


# --------------------------------------------------------------------- lane: a Unix socket on the same machine
#
# Message format, both directions: a prefix (struct "<IQ": envelope length, inline bytes that follow), the
# envelope (a dict in ``marshal`` format: both sides run the same Python), then its inline frames back to
# back. ``f`` lists the message's frames: an int is an inline frame of that many bytes, [segment, offset,
# size] one in the sender's shared-memory arena. A message may carry file
# descriptors (SCM_RIGHTS): ``s`` lists [segment, size] of new arena segments, one descriptor each, in order.
# ``x`` lists segments the sender dropped; ``fr`` lists [segment, offset] regions of the *receiver's* arena
# that the sender no longer uses (their values were garbage-collected).
#
# host -> kernel: hello {t: token} (with the status page's descriptor), req {i, h: header}, cancel {i};
#                 any message may carry s, x, fr
# kernel -> host: ready {pid}, out {i, t: msg_type} (frame 0: the IOPub content as JSON), rep {i, h: reply header}
#
# The status page (8 bytes at 0: the request number running now, 0 when none; 8 bytes at 8: the request an
# interrupt is meant for, or LANE_ANY; 8 bytes at 16: the last request run to its end, written before 0 is
# cleared) is shared memory the host made: no message says a request started or ended.
# Before it runs request i the kernel drains the socket for cancels, writes i at 0 and looks for a cancel once
# more; the host, abandoning i, sends ``cancel`` and then reads 0. One of them sees the other (the socket
# calls order their memory accesses): a request is either skipped or seen running, and interrupted then.
# While a lane request runs, SIGINT raises KeyboardInterrupt only if 8 holds its number or LANE_ANY.

LANE_INLINE_MAX = 1 << 20  # frames bigger than this travel through the arena
LANE_SEGMENT_MIN = 64 << 20  # the smallest arena segment
LANE_RETAIN = 256 << 20  # free arena memory kept for later transfers; beyond it, free segments are dropped...
LANE_RETAIN_SECONDS = 60.0  # ...once they have been free this long (big transfers a minute apart reuse them)
LANE_WINDOW = 64 << 20  # a writer maps (and populates) at most this much of a segment at once
_LANE_PREFIX_SIZE = 12
_LANE_SCRATCH = 256 * 1024
_LANE_PARENT = "kernelproxy-lane:"  # msg_id prefix of the parent header set while a lane request runs
LANE_ANY = (1 << 64) - 1  # interrupt whatever lane request runs (Kernel.interrupt())
LANE_STATUS_SIZE = 4096


def _lane_pack(message, frames, arena=None, frees=None):
    """The buffers (for one sendmsg) and file descriptors of ``message`` with ``frames``."""
    import struct

    descriptors = []
    inline = []
    for frame in frames:
        view = memoryview(frame)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        if arena is not None and view.nbytes > LANE_INLINE_MAX:
            descriptors.append(arena.put(view))
        else:
            descriptors.append(view.nbytes)
            inline.append(view)
    if descriptors:
        message["f"] = descriptors
    fds = []
    if arena is not None:
        new, dropped = arena.take_news()
        if new:
            message["s"] = [[segment, size] for segment, size, _ in new]
            fds = [fd for _, _, fd in new]
        if dropped:
            message["x"] = dropped
    if frees:
        message["fr"] = frees
    import marshal

    body = marshal.dumps(message)
    total = sum(view.nbytes for view in inline)
    return [struct.pack("<IQ", len(body), total) + body] + inline, fds


def _fresh_buffer(size):
    """Writable memory for a received frame: an untouched anonymous mapping for big ones (no zero-fill pass)."""
    if size <= LANE_INLINE_MAX:
        return bytearray(size)
    import mmap

    return mmap.mmap(-1, size)


class LaneReader(object):
    """Parses lane messages from a byte stream (either side).

    Feed it with ``view, direct = reader.buffer()``, a ``recv_into`` of that
    view, then ``reader.received(n, direct)``: big inline frames are read
    straight into their own buffers; the rest goes through a scratch buffer.
    ``on_message(message, frames)`` gets each complete message.
    """

    def __init__(self, on_message, maps):
        self._scratch = bytearray(_LANE_SCRATCH)
        self._on_message = on_message
        self.maps = maps  # the peer's arena segments, as this side maps them
        self.fds = []  # descriptors received, not yet claimed by a message
        self._target = bytearray(_LANE_PREFIX_SIZE)
        self._view = memoryview(self._target)
        self._filled = 0
        self._phase = 0  # 0: prefix, 1: JSON, 2: inline frames
        self._message = None
        self._frames = []
        self._inline = []  # indexes (into _frames) of inline frames still to fill

    def buffer(self):
        if self._phase == 2 and len(self._view) - self._filled >= _LANE_SCRATCH:
            return self._view[self._filled :], True
        return memoryview(self._scratch), False

    def received(self, count, direct):
        if direct:
            self._filled += count
            if self._filled == len(self._view):
                self._advance()
            return
        view = memoryview(self._scratch)[:count]
        if self._phase == 0 and not self._filled:
            view = self._whole_messages(view)
        while view:
            take = min(len(view), len(self._view) - self._filled)
            self._view[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._view):
                self._advance()

    def _whole_messages(self, view):
        """Take the complete messages at the start of ``view`` at once (the common case); return the rest.

        A small message then costs one parse, not one per part through the
        piecewise path below (a tenth of a trivial call's time on each side).
        """
        import struct

        while len(view) >= _LANE_PREFIX_SIZE:
            length, total = struct.unpack_from("<IQ", view)
            start = _LANE_PREFIX_SIZE + length
            if len(view) < start + total:
                break
            self._begin(view[_LANE_PREFIX_SIZE:start])
            for index in self._inline:
                frame = self._frames[index]
                size = len(frame)
                if size:
                    memoryview(frame).cast("B")[:] = view[start : start + size]
                start += size
            message, frames = self._message, self._frames
            self._message, self._frames, self._inline = None, [], []
            view = view[start:]
            self._on_message(message, frames)
        return view

    def _begin(self, body):
        """A message's header (``body``) arrived: map its new segments, make its frames' buffers."""
        import marshal

        message = marshal.loads(body)
        if not isinstance(message, dict):
            raise ValueError("a lane message is not a dict")
        self._message = message
        segments = message.get("s")
        if segments:
            for segment, size in segments:
                self.maps.add(segment, size, self.fds.pop(0))
        for segment in message.get("x") or ():
            self.maps.drop(segment)
        self._frames = []
        self._inline = []
        for descriptor in message.get("f") or ():
            if isinstance(descriptor, int):
                self._inline.append(len(self._frames))
                self._frames.append(_fresh_buffer(descriptor))
            else:
                self._frames.append(self.maps.view(*descriptor))

    def _expect(self, target):
        self._target = target
        self._view = memoryview(target).cast("B") if len(target) else memoryview(b"")
        self._filled = 0

    def _advance(self):
        while True:
            if self._phase == 0:
                import struct

                length, _ = struct.unpack("<IQ", self._target)
                self._phase = 1
                self._expect(bytearray(length))
                if length:
                    return
            elif self._phase == 1:
                self._begin(self._target)
                self._phase = 2
            elif self._inline:
                self._expect(self._frames[self._inline.pop(0)])
                if len(self._view):
                    return
            else:
                message, frames = self._message, self._frames
                self._message, self._frames, self._phase = None, [], 0
                self._expect(bytearray(_LANE_PREFIX_SIZE))
                self._on_message(message, frames)
                return


class LaneArena(object):
    """The shared memory one side writes its big frames into: memfd segments, handed to the peer once each.

    A frame takes a region of a segment until the peer says (``fr``) that the
    value built on it is gone. Segments are created zero-filled in one go
    (``posix_fallocate``, much cheaper than faulting pages in one by one) and
    kept for later transfers: up to LANE_RETAIN of free memory for good, more
    for LANE_RETAIN_SECONDS (``trim()``, which its owner calls when
    ``trim_due()`` says so, drops the rest and announces it with ``x``).
    """

    def __init__(self):
        self._segments = {}  # id -> [fd, size, free regions as [offset, size] sorted by offset]
        self._used = {}  # (segment, offset) -> size
        self._next = 0
        self._new = []  # (segment, size, fd) not yet announced to the peer
        self._dropped = []  # segments to announce as dropped
        self._free_since = {}  # segment -> time.monotonic() since when it is entirely free
        self.closed = False

    @staticmethod
    def supported():
        return hasattr(os, "memfd_create") and hasattr(os, "posix_fallocate")

    def put(self, view):
        """Copy ``view`` into a free region; return its descriptor [segment, offset, size]."""
        import mmap

        size = view.nbytes
        rounded = -(-size // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        segment, offset = self._allocate(rounded)
        fd = self._segments[segment][0]
        populate = getattr(mmap, "MAP_POPULATE", 0)
        for start in range(0, size, LANE_WINDOW):
            length = min(LANE_WINDOW, rounded - start)
            window = mmap.mmap(fd, length, flags=mmap.MAP_SHARED | populate, offset=offset + start)
            try:
                end = min(start + LANE_WINDOW, size)
                window[: end - start] = view[start:end]
            finally:
                window.close()
        return [segment, offset, size]

    def _allocate(self, size):
        for segment, (_, _, free) in self._segments.items():
            for index, (offset, length) in enumerate(free):
                if length >= size:
                    if length == size:
                        del free[index]
                    else:
                        free[index] = [offset + size, length - size]
                    self._used[(segment, offset)] = size
                    self._free_since.pop(segment, None)
                    return segment, offset
        total = max(size, LANE_SEGMENT_MIN)
        fd = os.memfd_create("kernelproxy-lane", getattr(os, "MFD_CLOEXEC", 1))
        try:
            os.ftruncate(fd, total)
            os.posix_fallocate(fd, 0, total)  # the pages, zeroed in one go (and ENOSPC now, not SIGBUS later)
        except BaseException:
            os.close(fd)
            raise
        segment = self._next
        self._next += 1
        self._segments[segment] = [fd, total, [[size, total - size]] if total > size else []]
        self._new.append((segment, total, fd))
        self._used[(segment, 0)] = size
        return segment, 0

    def release(self, segment, offset):
        """The peer is done with a region: free it; drop whole free segments beyond LANE_RETAIN."""
        size = self._used.pop((segment, offset), None)
        if size is None:
            return
        free = self._segments[segment][2]
        free.append([offset, size])
        free.sort()
        merged = [free[0]]
        for start, length in free[1:]:
            if merged[-1][0] + merged[-1][1] == start:
                merged[-1][1] += length
            else:
                merged.append([start, length])
        free[:] = merged
        if free == [[0, self._segments[segment][1]]]:
            import time

            self._free_since[segment] = time.monotonic()

    def _spare(self):
        return sum(length for _, _, free in self._segments.values() for _, length in free)

    def trim_due(self):
        """Seconds until ``trim()`` may drop a segment (free memory beyond LANE_RETAIN), or None."""
        if not self._free_since or self._spare() <= LANE_RETAIN:
            return None
        import time

        oldest = min(self._free_since.values())
        return max(0.0, oldest + LANE_RETAIN_SECONDS - time.monotonic())

    def trim(self):
        """Drop segments free for LANE_RETAIN_SECONDS while the free memory exceeds LANE_RETAIN, biggest first."""
        import time

        spare = self._spare()
        now = time.monotonic()
        for segment in sorted(self._free_since, key=lambda s: -self._segments[s][1]):
            if spare <= LANE_RETAIN:
                break
            if now - self._free_since[segment] < LANE_RETAIN_SECONDS:
                continue
            fd, total, _ = self._segments.pop(segment)
            del self._free_since[segment]
            os.close(fd)
            self._dropped.append(segment)
            spare -= total
        return bool(self._dropped)

    def take_news(self):
        """Segments created and dropped since the last call (announced with the next message)."""
        new, dropped = self._new, self._dropped
        self._new, self._dropped = [], []
        return new, dropped

    @property
    def size(self):
        return sum(total for _, total, _ in self._segments.values())

    def close(self):
        self.closed = True
        for fd, _, _ in self._segments.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._segments.clear()
        for _, _, fd in self._new:  # created but never sent
            try:
                os.close(fd)
            except OSError:
                pass
        self._new = []


class LaneMaps(object):
    """The peer's arena, as the receiving side sees it: a frame in it becomes a mapping of its own.

    The value built on a frame keeps that mapping alive; when the value is
    garbage-collected the mapping goes, and the region is queued in ``frees``
    to be handed back to the peer with the next message.
    """

    def __init__(self):
        import collections

        self._fds = {}
        self.frees = collections.deque()  # (segment, offset), appended from any thread (finalizers)

    def add(self, segment, size, fd):
        self._fds[segment] = fd

    def drop(self, segment):
        fd = self._fds.pop(segment, None)
        if fd is not None:
            os.close(fd)

    def view(self, segment, offset, size):
        import mmap
        import weakref

        rounded = -(-size // mmap.ALLOCATIONGRANULARITY) * mmap.ALLOCATIONGRANULARITY
        if not size:
            self.frees.append((segment, offset))
            return bytearray()
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(self._fds[segment], rounded, flags=flags, offset=offset)
        weakref.finalize(mapping, self.frees.append, (segment, offset))
        return memoryview(mapping)[:size] if size != rounded else mapping

    def take_frees(self):
        frees = []
        while True:
            try:
                segment, offset = self.frees.popleft()
            except IndexError:
                return frees
            frees.append([segment, offset])

    def close(self):
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def lane_listen(path, token):
    """Serve a lane on a Unix socket at ``path`` from this thread's event loop (call it from the main thread).

    Returns a description, or raises why this kernel cannot have a lane. The
    socket accepts one connection, from this user, that knows ``token``; the
    path is removed once it is connected.
    """
    import asyncio
    import socket

    if not hasattr(socket, "AF_UNIX"):
        raise RuntimeError("no Unix sockets here")
    import threading

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("the lane must be served from the kernel's main thread")
    loop = asyncio.get_running_loop()
    kernel = sys.modules["IPython"].get_ipython().kernel
    _hook_output(kernel)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # No umask change around bind (it is process-wide: another thread's files would get it): the socket's
    # directory is the owner's only (0700), so nobody else reaches the socket before the chmod.
    listener.bind(path)
    os.chmod(path, 0o600)
    listener.listen(1)
    listener.setblocking(False)

    def accept():
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return
        loop.remove_reader(listener.fileno())
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass
        if not _same_user(connection):
            connection.close()
            return
        _KernelLane(connection, loop, kernel, token)

    loop.add_reader(listener.fileno(), accept)
    return {"arena": LaneArena.supported()}


def _lane_expression(path, token):
    """lane_listen() for the host's execute request: its answer, or why not, as a Bundle."""
    try:
        answer = lane_listen(path, token)
        answer["status"] = "ok"
    except BaseException as exc:
        answer = {"status": "error", "ename": type(exc).__name__, "evalue": str(exc)}
    return Bundle(answer)


def _same_user(connection):
    import socket
    import struct

    try:
        credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", credentials)
        return uid == os.getuid()
    except (AttributeError, OSError):
        return True  # no SO_PEERCRED here: the socket's 0600 mode and its 0700 directory keep others out


_lanes_by_parent = {}  # parent msg_id -> (lane, request id): where output of a running lane request goes
lanes = []  # the lanes open in this kernel


def _hook_output(kernel):
    """Route IOPub output whose parent is a lane request to that lane instead of IOPub (idempotent)."""
    sessions = []
    for owner in (kernel, sys.stdout, sys.stderr, getattr(kernel.shell, "display_pub", None)):
        session = getattr(owner, "session", None)
        if session is not None and all(session is not seen for seen in sessions):
            sessions.append(session)
    for session in sessions:
        if getattr(session.send, "_kernelproxy_lane", False):
            continue
        session.send = _lane_aware_send(session.send)


_OUTPUT_TYPES = frozenset(("stream", "display_data", "update_display_data", "clear_output", "execute_result", "error"))


def _lane_aware_send(send):
    def lane_aware_send(stream, msg_or_type, content=None, parent=None, *args, **kwargs):
        if _lanes_by_parent:
            if isinstance(msg_or_type, dict):
                msg_type, content, parent = msg_or_type.get("msg_type"), msg_or_type.get("content"), msg_or_type.get(
                    "parent_header"
                )
            else:
                msg_type = msg_or_type
            if isinstance(parent, dict) and msg_type in _OUTPUT_TYPES:
                msg_id = parent.get("msg_id") or (parent.get("header") or {}).get("msg_id")
                target = _lanes_by_parent.get(msg_id)
                if target is not None:
                    lane, request = target
                    lane.send_output(request, msg_type, content)
                    return None
        return send(stream, msg_or_type, content, parent, *args, **kwargs)

    lane_aware_send._kernelproxy_lane = True
    return lane_aware_send


class _KernelLane(object):
    """The kernel's end of one lane: requests run one at a time on the main thread, between the loop's other work."""

    def __init__(self, connection, loop, kernel, token):
        import collections
        import select
        import threading

        connection.setblocking(False)
        self._sock = connection
        self._session = self._session_ids = None  # see _parent()
        self._poll = None  # tells whether anything came, for a quarter of the cost of a read that finds nothing
        if hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(connection.fileno(), select.POLLIN)
        self._loop = loop
        self._kernel = kernel
        self._token = token
        self._authenticated = False
        self._maps = LaneMaps()
        self._arena = LaneArena() if LaneArena.supported() else None
        self._reader = LaneReader(self._on_message, self._maps)
        self._queue = collections.deque()
        self._cancelled = set()
        self._scheduled = False
        self._send_lock = threading.Lock()  # output may come from other threads (ipykernel's IOPub thread)
        self._closed = False
        self._status = None  # the status page, shared with the host (see the lane's format above)
        self._trim_scheduled = False
        loop.add_reader(connection.fileno(), self._on_readable)
        lanes.append(self)

    # ---------------------------------------------------------------- reading

    def _on_readable(self):
        if self._read():
            self._run_next(fresh=True)

    def _read(self):
        """Read what is there; return False once the lane is closed."""
        import socket

        while not self._closed:
            view, direct = self._reader.buffer()
            try:
                count, ancillary, _, _ = self._sock.recvmsg_into([view], socket.CMSG_SPACE(64 * 4))
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                self.close()
                return False
            for level, kind, data in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    import array

                    fds = array.array("i")
                    fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
                    self._reader.fds.extend(fds)
            if count == 0:
                self.close()
                return False
            try:
                self._reader.received(count, direct)
            except Exception:  # a malformed stream: nothing more can be read from it
                self.close()
                return False
            if count < len(view) and not ancillary:
                return True  # the socket was empty (a read that brought descriptors can end short before more)
        return False

    def _read_waiting(self):
        """Read what came meanwhile, if anything did."""
        if self._poll is None or self._poll.poll(0):
            self._read()

    def _on_message(self, message, frames):
        if self._arena is not None and message.get("fr"):
            with self._send_lock:  # the arena is also written from ipykernel's IOPub thread (output)
                for segment, offset in message["fr"]:
                    self._arena.release(segment, offset)
            self._schedule_trim()
        kind = message.get("k")
        if not self._authenticated:
            if kind == "hello" and message.get("t") == self._token and self._reader.fds:
                import mmap

                fd = self._reader.fds.pop(0)
                try:
                    self._status = mmap.mmap(fd, LANE_STATUS_SIZE, flags=mmap.MAP_SHARED)
                finally:
                    os.close(fd)
                self._authenticated = True
                self._send({"k": "ready", "pid": os.getpid()})
            else:
                self.close()
            return
        if kind == "req":
            rid = message.get("r")
            self._queue.append((message.get("i"), message.get("h"), frames, rid if isinstance(rid, str) else None))
        elif kind == "cancel":
            self._cancelled.add(message.get("i"))

    # ---------------------------------------------------------------- running requests

    def _run_next(self, fresh=False):
        """Run the next queued request; leave the rest for later loop iterations (other handlers get their turn).

        ``fresh``: the socket was just read (from the reader callback).
        """
        self._scheduled = False
        if self._closed or not self._queue:
            return
        if not fresh:
            self._read_waiting()  # cancels that came meanwhile
        while self._queue and not self._closed:
            request, header, frames, rid = self._queue.popleft()
            if request not in self._cancelled:
                self._set_status(0, request)
                self._read_waiting()  # a cancel sent before the host could see the status
            if request in self._cancelled:
                self._set_status(0, 0)
                self._cancelled.discard(request)
                self._reply(request, _error("cancelled", "Cancelled", "cancelled before it started")[0], [])
                continue
            self._run(request, header, frames, rid)
            break
        if self._queue and not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._run_next)

    def _set_status(self, offset, value):
        import struct

        if self._status is not None and not self._status.closed:
            struct.pack_into("<Q", self._status, offset, value)

    def aimed_at_running(self):
        """Whether a request runs here and an interrupt is aimed at it (see the status page)."""
        import struct

        if self._status is None or self._status.closed:
            return False
        running, target = struct.unpack_from("<QQ", self._status, 0)
        return running != 0 and (target == LANE_ANY or target == running)

    def _run(self, request, header, frames, rid):
        import _signal

        if rid is not None:
            seen, kept = _recall(rid)
            if seen:  # sent again (after a lost reply): answer again, never run it twice
                self._set_status(0, 0)
                reply, out = kept if kept is not None else _lost_reply()
                self._reply(request, reply, out)
                return

        parent_id = _LANE_PARENT + str(request)
        _lanes_by_parent[parent_id] = (self, request)
        try:
            self._kernel.set_parent([], self._parent(parent_id), "shell")
        except Exception:
            pass
        try:
            try:
                if _signal.getsignal(_signal.SIGINT) is not _lane_sigint:  # no system call when it is there already
                    _previous_sigint[:] = [_signal.signal(_signal.SIGINT, _lane_sigint)]
                reply, out = dispatch(header, frames, self._kernel.shell.user_ns, rid)
                _flush_output()  # output reaches the lane before the reply
            except KeyboardInterrupt as exc:  # landed outside the user's code
                reply, out = _exception_reply(exc, kind="interrupted")
        finally:
            _lanes_by_parent.pop(parent_id, None)
            self._set_status(8, 0)  # an interrupt meant for this request, arriving late, hits nothing else
            self._set_status(16, request)  # it ran (its reply may still be on its way): not one to call skipped
            self._set_status(0, 0)
        if rid is not None:
            _remember(rid, (reply, out), 0, False)
        self._reply(request, reply, out)

    def _parent(self, msg_id):
        session = self._kernel.session
        if session is not self._session:  # its ids read once: each read of a traitlet costs
            self._session = session
            self._session_ids = (getattr(session, "session", ""), getattr(session, "username", ""))
        return _lane_parent(msg_id, *self._session_ids)

    def _reply(self, request, reply, out):
        try:
            self._send({"k": "rep", "i": request, "h": reply}, out)
        except (TypeError, ValueError) as exc:  # a reply header JSON cannot carry
            self._send({"k": "rep", "i": request, "h": _error("protocol", type(exc).__name__, str(exc))[0]})

    def send_output(self, request, msg_type, content):
        """Send one IOPub message of a running request over the lane (from any thread)."""
        try:
            data = self._kernel.session.pack(content)
        except Exception:
            data = json.dumps(content, default=repr).encode("utf-8")
        try:
            self._send({"k": "out", "i": request, "t": msg_type}, [data])
        except OSError:
            pass

    # ---------------------------------------------------------------- writing

    def _send(self, message, frames=()):
        import select
        import socket

        with self._send_lock:
            if self._closed:
                raise OSError("the lane is closed")
            buffers, fds = _lane_pack(message, frames, self._arena if frames else None, self._maps.take_frees())
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, _fd_bytes(fds))] if fds else []
            pending = [view for view in (memoryview(buffer).cast("B") for buffer in buffers) if view.nbytes]
            while pending:
                try:
                    sent = self._sock.sendmsg(pending, ancillary)
                except (BlockingIOError, InterruptedError):
                    select.select([], [self._sock], [], 1.0)
                    continue
                ancillary = []
                while sent and pending:
                    if sent >= len(pending[0]):
                        sent -= len(pending[0])
                        pending.pop(0)
                    else:
                        pending[0] = pending[0][sent:]
                        sent = 0

    def _schedule_trim(self):
        due = self._arena.trim_due() if self._arena is not None else None
        if due is not None and not self._trim_scheduled:
            self._trim_scheduled = True
            self._loop.call_later(due + 0.05, self._trim)

    def _trim(self):
        """Drop arena segments long free; tell the host at once (its descriptor keeps the memory otherwise)."""
        self._trim_scheduled = False
        if self._closed or self._arena is None:
            return
        with self._send_lock:
            dropped = self._arena.trim()
        if dropped:
            try:
                self._send({"k": "trim"})
            except OSError:
                return
        self._schedule_trim()

    def arena_state(self):
        """(bytes of this side's arena, regions in use; regions of the host's arena mapped here): for tests."""
        arena = self._arena
        return {
            "arena_bytes": arena.size if arena is not None else 0,
            "arena_regions": len(arena._used) if arena is not None else 0,
            "peer_segments": len(self._maps._fds),
        }

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._sock.fileno())
        except Exception:
            pass
        self._sock.close()
        self._maps.close()
        if self._arena is not None:
            self._arena.close()
        if self._status is not None:
            self._status.close()
        if self in lanes:
            lanes.remove(self)
        for key in [key for key, (lane, _) in _lanes_by_parent.items() if lane is self]:
            _lanes_by_parent.pop(key, None)


def _fd_bytes(fds):
    import array

    return array.array("i", fds).tobytes()


_previous_sigint = []  # the SIGINT handler _lane_sigint took over (ipykernel's SIG_IGN between requests)


def _lane_sigint(signum, frame):
    """SIGINT once a lane has run a request: KeyboardInterrupt in the lane request it is aimed at.

    It stays installed (installing it per request costs two system calls);
    ipykernel puts its own in place while its handlers run, and back after.
    With no lane request running, the handler it replaced decides.
    """
    for lane in lanes:
        if lane.aimed_at_running():
            _sigints[0] += 1  # an interrupt, told from the user's own raise KeyboardInterrupt (see dispatch)
            raise KeyboardInterrupt
    previous = _previous_sigint[0] if _previous_sigint else None
    if callable(previous):
        previous(signum, frame)


def _lane_parent(msg_id, session, username):
    """A message for ipykernel's set_parent(): output produced meanwhile carries msg_id as its parent's."""
    header = {
        "msg_id": msg_id,
        "msg_type": "kernelproxy_lane_request",
        "session": session,
        "username": username,
        "date": "",
        "version": "5.3",
    }
    return {
        "header": header,
        "msg_id": msg_id,
        "msg_type": header["msg_type"],
        "parent_header": {},
        "metadata": {},
        "content": {},
    }
