"""Security: only messages signed with the kernel's key are used, never unpickled otherwise; local kernels
listen on private IPC sockets with a fresh, strong key.

Already covered elsewhere (not repeated here): connecting with a wrong key or an empty key fails
(test_lifecycle.py), the IPC directory and the connection file are owner-only (test_lifecycle.py), and comm
buffers altered in either direction are refused (test_comm_transport.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
import zmq
from jupyter_client.session import Session

import kernelproxy
from kernelproxy._transports import comm as comm_module

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def receive_on_io_thread(kernel: kernelproxy.Kernel, frames: list[bytes]) -> dict[str, Any] | None:
    """Feed raw frames to the connection's verifier, on the IO thread that owns it, as its readers do."""
    connection = kernel.aio._state.connection

    async def receive() -> dict[str, Any] | None:
        return connection.wire.receive([zmq.Frame(frame) for frame in frames])

    return kernel._portal.run(receive())


def signed_by(key: bytes, like: Session) -> Session:
    """A Session that signs like ``like`` (same scheme, session id, user) but with ``key``."""
    return Session(key=key, signature_scheme=like.signature_scheme, session=like.session, username=like.username)


def stream_message(session: Session, text: str = "forged") -> list[bytes]:
    return session.serialize(session.msg("stream", {"name": "stdout", "text": text}))


# ---------------------------------------------------------------------- host-side verification


def _wrong_key(session: Session) -> list[bytes]:
    return stream_message(signed_by(b"not-the-kernel-key", session))


def _unsigned(session: Session) -> list[bytes]:
    return stream_message(signed_by(b"", session))


def _content_altered_after_signing(session: Session) -> list[bytes]:
    frames = stream_message(session)
    frames[-1] = frames[-1].replace(b"forged", b"FORGED")  # same length; the signature no longer matches
    return frames


def _signature_zeroed(session: Session) -> list[bytes]:
    frames = stream_message(session)
    frames[1] = b"0" * len(frames[1])
    return frames


def _truncated(session: Session) -> list[bytes]:
    return stream_message(session)[:-2]


def _not_a_message(session: Session) -> list[bytes]:
    return [b"<IDS|MSG>", b"garbage", b"{", b"", b""]


FORGERIES = [_wrong_key, _unsigned, _content_altered_after_signing, _signature_zeroed, _truncated, _not_a_message]


@pytest.mark.local_kernel('zmq message signing; through a server, the server signs')
@pytest.mark.parametrize("forge", FORGERIES, ids=[f.__name__.strip("_") for f in FORGERIES])
def test_host_drops_and_counts_messages_that_fail_verification(kernel, forge):
    connection = kernel.aio._state.connection
    before = connection.rejected_messages
    assert receive_on_io_thread(kernel, forge(connection.session)) is None
    assert connection.rejected_messages == before + 1
    assert kernel.call(lambda: "still usable") == "still usable"


@pytest.mark.local_kernel('zmq message signing; through a server, the server signs')
def test_host_accepts_a_correctly_signed_message_once(kernel):
    """The control for the test above (the verifier does accept good messages), and replays are refused."""
    connection = kernel.aio._state.connection
    frames = stream_message(connection.session, "genuine")
    before = connection.rejected_messages
    message = receive_on_io_thread(kernel, frames)
    assert message is not None and message["content"]["text"] == "genuine"
    assert connection.rejected_messages == before
    assert receive_on_io_thread(kernel, frames) is None, "a replayed message (same signature) was accepted"
    assert connection.rejected_messages == before + 1


# ---------------------------------------------------------------------- end to end: forgeries on the wire


class MakesDirectoryWhenUnpickled:
    """Unpickling this creates a directory: proof that a forged buffer was (or was not) unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (self.path,))


def forge_from_inside_the_kernel(key: bytes | None, text: str, comm_id: str | None, digest: str, evil: bytes) -> int:
    """Runs in the kernel, in the middle of the host's request: publish on the kernel's own IOPub socket a
    stream message and (comm) a comm reply to that request, signed with ``key`` (None: the kernel's key)."""
    import time

    from IPython import get_ipython
    from jupyter_client.session import Session

    kernel = get_ipython().kernel
    parent = kernel.get_parent("shell")
    real = kernel.session
    forger = (
        real
        if key is None
        else Session(key=key, signature_scheme=real.signature_scheme, session=real.session, username=real.username)
    )
    forger.send(kernel.iopub_socket, "stream", {"name": "stdout", "text": text}, parent=parent)
    if comm_id is not None:
        reply = {"comm_id": comm_id, "data": {"header": {"status": "ok"}, "digest": digest}}
        forger.send(kernel.iopub_socket, "comm_msg", reply, parent=parent, buffers=[evil])
    time.sleep(0.1)  # not needed for order (same IOPub socket, or IOPub before 'idle'), just margin
    return 42


def _forgery_arguments(kernel: kernelproxy.Kernel, marker: Path) -> tuple[str | None, str, bytes]:
    evil = cloudpickle.dumps(MakesDirectoryWhenUnpickled(str(marker)))
    transport = kernel.aio._state.transport
    if isinstance(transport, comm_module.CommTransport):
        return transport._comm_id, comm_module.digest_frames(transport.digest, [evil]), evil
    return None, "", evil


@pytest.mark.local_kernel('zmq message signing; through a server, the server signs')
def test_forged_iopub_messages_signed_with_another_key_are_dropped_not_unpickled(kernel, tmp_path, capsys):
    """A process that can publish on the kernel's IOPub (here: code in the kernel itself) but lacks the key:
    its stream text is not shown, and its comm reply, carrying a pickle that would run code here, is
    neither taken as the reply nor unpickled."""
    connection = kernel.aio._state.connection
    marker = tmp_path / "unpickled-on-the-host"
    comm_id, digest, evil = _forgery_arguments(kernel, marker)
    before = connection.rejected_messages
    result = kernel.options(output="forward").call(
        forge_from_inside_the_kernel, b"not-the-kernel-key", "FORGED-TEXT", comm_id, digest, evil
    )
    assert result == 42, "the host took a forged reply for the real one"
    assert not marker.exists(), "a forged, wrongly signed buffer was unpickled on the host"
    assert "FORGED-TEXT" not in capsys.readouterr().out
    forged = 2 if comm_id is not None else 1
    assert connection.rejected_messages == before + forged


def test_forgeries_signed_with_the_kernel_key_do_arrive(kernel, tmp_path, capsys):
    """The control for the test above: the same forgeries signed with the right key are taken (whoever has
    the key is trusted, as the README says), so the refusal above is the signature check's doing."""
    marker = tmp_path / "unpickled-on-the-host"
    comm_id, digest, evil = _forgery_arguments(kernel, marker)
    result = kernel.options(output="forward").call(
        forge_from_inside_the_kernel, None, "SIGNED-TEXT", comm_id, digest, evil
    )
    assert "SIGNED-TEXT" in capsys.readouterr().out
    if comm_id is not None:  # the signed comm reply was taken as the reply, and unpickled
        assert result is None and marker.is_dir()
    else:
        assert result == 42
    assert kernel.call(lambda: "still usable") == "still usable"


@pytest.mark.local_kernel('zmq message signing; through a server, the server signs')
def test_kernel_ignores_requests_signed_with_another_key(kernel, tmp_path):
    """The other direction: a request sent straight to the kernel's shell socket with a wrong key never runs."""
    info = json.loads(Path(kernel.info.connection_file).read_text())
    url = f"{info['transport']}://{info['ip']}" + ("-" if info["transport"] == "ipc" else ":") + str(info["shell_port"])
    marker = tmp_path / "ran-in-the-kernel"
    session = signed_by(
        b"not-the-kernel-key", Session(key=info["key"].encode(), signature_scheme=info["signature_scheme"])
    )
    code = f"open({str(marker)!r}, 'w').close()"
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        sock.connect(url)
        for msg_type, content in [
            (
                "execute_request",
                {
                    "code": code,
                    "silent": True,
                    "store_history": False,
                    "user_expressions": {},
                    "allow_stdin": False,
                    "stop_on_error": False,
                },
            ),
            ("execute_request", {"code": "", "silent": True, "user_expressions": {"x": code}}),
        ]:
            sock.send_multipart(session.serialize(session.msg(msg_type, content)))
        time.sleep(0.5)
        assert kernel.call(lambda: "after") == "after"  # the kernel has read its queue by now
        assert sock.poll(200) == 0, "the kernel answered a wrongly signed request"
    finally:
        sock.close(0)
        context.term()
    assert not marker.exists(), "the kernel ran a request signed with another key"


# ---------------------------------------------------------------------- sockets and keys of started kernels


@pytest.mark.local_kernel("checks the local kernel's sockets and key")
def test_started_kernels_listen_on_ipc_with_a_fresh_strong_key(kernel, transport):
    with kernelproxy.start(transport=transport) as other:
        infos = [json.loads(Path(k.info.connection_file).read_text()) for k in (kernel, other)]
        host_keys = [k.aio._state.connection.session.key for k in (kernel, other)]
    keys = []
    for info, host_key, k in zip(infos, host_keys, (kernel, other)):
        assert info["transport"] == "ipc", f"a local kernel listens on {info['transport']}, not on IPC sockets"
        private_dir = os.path.dirname(k.info.connection_file)
        assert os.path.dirname(info["ip"]) == private_dir, "the sockets are not in the kernel's private directory"
        assert info["signature_scheme"] == "hmac-sha256"
        digits = info["key"].replace("-", "")
        assert len(digits) >= 32 and all(c in "0123456789abcdef" for c in digits), info["key"]
        assert host_key == info["key"].encode(), "the host does not sign with the connection file's key"
        keys.append(info["key"])
    assert keys[0] != keys[1], "two kernels share a key"


def test_keyless_kernel_is_refused_unless_the_user_opts_in(tmp_path):
    from helpers import start_external_kernel, stop_external_kernel

    external = start_external_kernel(tmp_path, key=b"")
    try:
        with pytest.raises(kernelproxy.ConnectionFileError, match="allow_unsigned=True"):
            kernelproxy.connect(external.connection_file, startup_timeout=30)
        with kernelproxy.connect(external.connection_file, startup_timeout=30, allow_unsigned=True) as kernel:
            assert kernel.call(int, "7") == 7
    finally:
        stop_external_kernel(external)
