"""Wires: how Jupyter messages reach a kernel (its zmq sockets, or a server's websocket)."""
