"""A listening socket, bound before anything slow starts: a server whose port is taken says so on one line
and exits, before it loads a model or prints an address it will never answer on (torch-free; `advisor
serve` and `advisor proxy` both use it)."""

from __future__ import annotations

import socket


class ListenError(OSError):
    """The address cannot be listened on (taken, not this machine's, no permission)."""


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) and listening, ready to hand to `uvicorn.Server.run(sockets=[...])`."""
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock = socket.socket(family, kind, proto)
    try:
        # as uvicorn itself does: a restart may reuse a port whose old connections linger in TIME_WAIT
        # (a live listener on it still refuses the bind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise ListenError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock
