"""Connecting the driver to a Ray cluster, or saying in one line why it cannot be reached.

ADDRESS is what Ray takes: `auto` (the cluster started on this machine with `ray start`), `HOST:PORT` (a
head node's GCS port), `ray://HOST:PORT` (Ray Client); None (or `local`) starts a Ray instance for this
run alone, stopped when the process ends. A HOST:PORT address is first tried with a plain TCP connection
(a few seconds at most), so an address where nothing listens fails at once instead of after Ray's own
reconnection timeouts.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from urllib.parse import urlsplit

from advisor.task import TaskError

PROBE_TIMEOUT_S = 5.0
NAMESPACE = "advisor"


class ClusterError(TaskError):
    """The Ray cluster cannot be reached (or Ray is not installed): one line naming the address."""


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or ray://HOST:PORT address; None for `auto` and friends."""
    if "://" not in address and ":" not in address:
        return None
    parts = urlsplit(address if "://" in address else "tcp://" + address)
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname or port is None:
        return None
    return parts.hostname, port


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def probe(address: str, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """A TCP connection to the address's host and port; `ClusterError` when nothing answers there."""
    hp = _host_port(address)
    if hp is None:
        return
    try:
        with socket.create_connection(hp, timeout=timeout_s):
            pass
    except OSError as e:
        why = e.strerror or type(e).__name__
        raise ClusterError(f"Ray cluster at {address} cannot be reached: {why}") from None


def connect(address: str | None) -> str:
    """Connects this process to the cluster at `address` (None or "local": a new local Ray), once; returns
    a short description of the cluster. Blocking (seconds): call it from a thread in async code."""
    try:
        import ray
    except ImportError:
        raise ClusterError(
            "the Ray backend needs Ray: pip install 'advisor[ray]' (or pip install ray)"
        ) from None
    where = address or "local"
    if not ray.is_initialized():
        probe(where)
        kwargs: dict = {
            "namespace": NAMESPACE,
            "log_to_driver": False,  # workers' output would tear through the progress display
            "logging_level": logging.ERROR,  # not its notes (token auth on, signal handlers) in our output
        }
        if where == "local":
            kwargs["include_dashboard"] = False
        hp = _host_port(where)
        if hp is not None and "://" not in where and _loopback(hp[0]):
            # a cluster on a loopback address (`ray start --node-ip-address=127.0.0.2`): this driver's node
            # is there too, not at the machine's outward address Ray would pick for it
            kwargs["_node_ip_address"] = hp[0]
        try:
            ray.init(address=where, **kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClusterError(f"Ray cluster at {where} cannot be reached: {first}") from None
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    return f"Ray cluster at {where}: {len(nodes)} node{'s' * (len(nodes) != 1)}, {cpus:g} CPUs"
