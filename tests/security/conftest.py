"""The host an attack must leave untouched: a marker file and an original repository outside the workspace,
Unix-socket listeners that record every connection, and marker processes to look for afterwards."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest


class Listener:
    """A Unix socket on the host that counts the connections made to it."""

    def __init__(self, address: str | bytes):
        self.address = address
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address)
        if isinstance(address, str):
            os.chmod(address, 0o777)  # anyone who can reach the path may connect: only confinement stops it
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file() and not p.is_symlink():
            h.update(p.read_bytes())
    return h.hexdigest()


@dataclass
class Host:
    dir: Path
    marker: Path
    repo: Path
    repo_digest: str
    path_sockets: list[Listener] = field(default_factory=list)  # in /tmp and /var/tmp, open to every uid
    private_socket: Listener | None = None  # in the test's own folder
    abstract_socket: Listener | None = None
    token: str = ""

    def files_untouched(self) -> None:
        assert self.marker.read_bytes() == b"host marker\n", "the marker outside the workspace changed"
        assert tree_digest(self.repo) == self.repo_digest, "the original repository changed"
        assert not (self.dir / "pwned").exists()

    def sockets_untouched(self, *, path: bool = True, abstract: bool = True) -> None:
        listeners = [self.private_socket] + (self.path_sockets if path else [])
        listeners += [self.abstract_socket] if abstract else []
        got = {str(x.address): x.connections for x in listeners if x is not None}
        assert not any(got.values()), f"host sockets were reached: {got}"


@contextlib.contextmanager
def open_workspace():
    """A workspace folder other users may reach by absolute path (limits mode as root runs model code
    as another uid), in a fresh folder of its own: pytest's temp folders are closed to other users,
    and another pytest session may close them again at any time."""
    top = Path(tempfile.mkdtemp(prefix="advisor-ws-", dir="/tmp"))
    top.chmod(0o755)
    ws = top / "ws"
    ws.mkdir()
    try:
        yield ws
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def host(tmp_path):
    d = tmp_path / "host"
    d.mkdir(mode=0o700)  # closed: only advisor's uid reaches the marker, the repository and this socket
    marker = d / "marker.txt"
    marker.write_bytes(b"host marker\n")
    repo = d / "repo"
    repo.mkdir()
    (repo / "app.py").write_text("print('original')\n")
    (repo / "README").write_text("the original repository\n")
    token = secrets.token_hex(4)
    h = Host(d, marker, repo, tree_digest(repo), token=token)
    h.private_socket = Listener(str(d / "host.sock"))
    for base in ("/tmp", "/var/tmp"):
        sd = Path(base) / f"advisor-attack-{token}"
        sd.mkdir()
        sd.chmod(0o777)
        h.path_sockets.append(Listener(str(sd / "host.sock")))
    h.abstract_socket = Listener(b"\0advisor-attack-" + token.encode())
    yield h
    for x in [h.private_socket, h.abstract_socket, *h.path_sockets]:
        x.close()
    for base in ("/tmp", "/var/tmp"):
        shutil.rmtree(Path(base) / f"advisor-attack-{token}", ignore_errors=True)


@pytest.fixture
def ws():
    with open_workspace() as root:
        yield root
