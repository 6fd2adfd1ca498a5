"""A Jupyter Server config file that turns Nagle's algorithm off on kernel websockets (the server-side remedy).

Jupyter Server writes each kernel message as its own websocket message and
leaves Nagle's algorithm on, so behind a proxy that delays its ACKs (any
receiver does by default on Linux, 40 ms) every message after the first of a
reply waits for the ACK of the one before. ``set_nodelay(True)`` on the
handler (tornado's documented switch, "mainly intended for use with
websockets") sends each at once. Load it with ``--config=nodelay_config.py``
or copy the lines into ``jupyter_server_config.py``.
"""

from jupyter_server.services.kernels.websocket import KernelWebsocketHandler

_open = KernelWebsocketHandler.open


async def _open_without_nagle(self, *args, **kwargs):
    self.set_nodelay(True)
    return await _open(self, *args, **kwargs)


KernelWebsocketHandler.open = _open_without_nagle
