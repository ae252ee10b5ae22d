"""A throwaway PostgreSQL cluster for tests: Debian's `postgresql` binaries, `initdb` in a temporary
folder, the server listening on 127.0.0.1 (a free port) and a socket in that folder, stopped by its PID.
Run as root, the server runs as the `postgres` user (it refuses root). Tests skip, saying why, where the
binaries are missing (.ci/run installs the package)."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def _bindir() -> Path | None:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True).stdout.strip()
        if out and (Path(out) / "initdb").is_file():
            return Path(out)
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(versions[-1]).parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def pg_cluster():
    """Yields a postgresql:// URL of a fresh cluster (user advisor, trust auth, database postgres), in a
    folder of its own under the system's temporary directory (pytest's is closed to other users, and
    the server may run as postgres), removed at the end."""
    bindir = _bindir()
    if bindir is None:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql; .ci/run does it)")
    as_user: dict = {}
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no postgres user to run the server as")
        as_user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    tmp = Path(tempfile.mkdtemp(prefix="advisor-pg-"))
    data = tmp / "pgdata"
    data.mkdir()
    if as_user:
        os.chown(data, as_user["user"], as_user["group"])
        os.chmod(tmp, 0o755)
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "advisor", "--auth=trust", "-E", "UTF8", "--no-sync"],
        check=True,
        capture_output=True,
        **as_user,
    )
    port = _free_port()
    log = open(tmp / "postgres.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            str(bindir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(data),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",  # a throwaway cluster: its durability is not what is tested
            "-c",
            "max_connections=100",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        **as_user,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not start: {(tmp / 'postgres.log').read_text()[-2000:]}")
            time.sleep(0.05)
        ready = bindir / "pg_isready"
        while subprocess.run(
            [str(ready), "-h", "127.0.0.1", "-p", str(port)], capture_output=True
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError("postgres never became ready")
            time.sleep(0.05)
        yield f"postgresql://advisor@127.0.0.1:{port}/postgres"
    finally:
        proc.send_signal(signal.SIGINT)  # fast shutdown
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
