"""Proxy overhead: `python -m advisor.bench --proxy`.

Three processes share the machine: a zero-latency upstream (`bench_upstream`: a bare asyncio protocol
answering a precomputed chat completion or stream), the real `advisor proxy` command (uvicorn, with
httptools and uvloop when installed; journal fsync on), and a load generator (`bench_client`:
precomputed requests, a minimal HTTP parser). The upstream is called directly and through the proxy,
at 1 and at 40 concurrent sessions, non-streamed and streamed, in one run. Printed side by side:
client-side latency p50 / p99 direct and proxied, the added latency, requests per second through the
proxy (closed loop: each session sends its next request when the last is answered), and the CPU each
process spent per proxied request (from /proc; the proxy's is the figure that matters, the others
show what the harness took from the same cores).

Then an open-loop run offers `--rate` requests per second (default 500) over 40 sessions, each
request due at a fixed time and its latency counted from then: the proxy sustains the rate when it
answers them all at that rate with a bounded p99. Each row says how busy each process was (CPU
seconds per wall second, of one core) and which one was CPU-bound, if any: a rate the proxy misses
while it is not CPU-bound was lost to the machine (the load average is printed before and after).
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from advisor.endpoints.http import preferred_client

_CLK = os.sysconf("SC_CLK_TCK")
_BOUND = 0.9  # a process busy this much of one core is CPU-bound (each is single-threaded at heart)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK


def _wait(port: int, path: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"port {port}: the server exited ({proc.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"port {port}: the server did not start")


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def load(spec: dict, watch: dict[str, int]) -> dict:
    """Runs the load generator with `spec`; adds the CPU seconds the `watch`ed processes spent meanwhile."""
    client = subprocess.Popen(
        [sys.executable, "-m", "advisor.proxy.bench_client", json.dumps(spec)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert client.stdin is not None and client.stdout is not None
    if client.stdout.readline().strip() != "warm":
        client.wait(timeout=30)
        raise RuntimeError(f"the load generator failed ({client.returncode})")
    before = {name: cpu_s(pid) for name, pid in watch.items()}
    client.stdin.write("go\n")
    client.stdin.flush()
    out = client.stdout.readline()
    after = {name: cpu_s(pid) for name, pid in watch.items()}
    client.wait(timeout=30)
    if client.returncode != 0 or not out:
        raise RuntimeError(f"the load generator failed ({client.returncode})")
    result = json.loads(out)
    result["cpu"] = {name: after[name] - before[name] for name in watch} | {"client": result["cpu_s"]}
    return result


def _proxy_config(tmp: Path, up_port: int) -> Path:
    price = {"input": 0.20, "cached_input": 0.04, "output": 1.15}

    def endpoint(model: str) -> dict:
        return {
            "provider": "openai",
            "model": model,
            "base_url": f"http://127.0.0.1:{up_port}/v1",
            "price": price,
        }

    config = tmp / "proxy.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "executor": {"endpoint": "flash"},
                "frontier": {"endpoint": "big"},
                "escalation": {"after_failures": 2},
                "budget": {"max_usd": 1000},
                "endpoints": {"flash": endpoint("flash"), "big": endpoint("big")},
            }
        )
    )
    return config


def _busy(result: dict) -> dict[str, float]:
    """Each process's CPU seconds per wall second of a run (1.0: one core, all the time)."""
    return {name: cpu / result["wall_s"] for name, cpu in result["cpu"].items()}


def _bound(busy: dict[str, float]) -> str:
    name, most = max(busy.items(), key=lambda kv: kv[1])
    if most >= _BOUND:
        return f"{name} CPU-bound"
    return f"none CPU-bound (busiest: {name})"


def _busy_cell(busy: dict[str, float]) -> str:
    return " / ".join(f"{100 * busy[k]:.0f}%" for k in ("proxy", "upstream", "client"))


def _server_stack() -> str:
    """How `advisor proxy` runs uvicorn here (its loop is uvicorn's "auto" pick)."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn with httptools (one write per reply) and {loop}"


def main(requests: int = 2000, rate: float = 500.0, seconds: float = 10.0) -> int:
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        up_port, px_port = _free_port(), _free_port()
        up = subprocess.Popen([sys.executable, "-m", "advisor.proxy.bench_upstream", str(up_port)])
        config = _proxy_config(Path(tmp), up_port)
        env = {**os.environ, "ADVISOR_CONFIG_DIR": str(Path(tmp) / "no-config")}
        px = subprocess.Popen(
            [sys.executable, "-m", "advisor.cli", "proxy", "--config", str(config), "--port", str(px_port)],
            env=env,
            stderr=subprocess.DEVNULL,
        )
        watch = {"proxy": px.pid, "upstream": up.pid}
        client = preferred_client(f"http://127.0.0.1:{up_port}/v1")  # what upstream_client auto picks
        direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
        proxy_url = f"http://127.0.0.1:{px_port}/v1/chat/completions"
        try:
            _wait(up_port, "/", up)
            _wait(px_port, "/health", px)
            print(
                "| sessions | stream | requests | direct p50 / p99 ms | proxied p50 / p99 ms | added p50 / p99 ms "
                "| proxied req/s | CPU ms/req proxy / upstream / client | busy proxy / upstream / client "
                "| failed direct / proxied |"
            )
            print("|---:|:---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for conc in (1, 40):
                for stream in (False, True):
                    n = requests if conc > 1 else requests // 4
                    spec = {"sessions": conc, "requests": n, "stream": stream}
                    direct = load({**spec, "url": direct_url, "model": "flash"}, watch)
                    proxied = load({**spec, "url": proxy_url, "model": "advisor"}, watch)
                    done = len(proxied["latencies_ms"]) + proxied["failed"]
                    per = {k: v * 1000 / max(1, done) for k, v in proxied["cpu"].items()}
                    d50, d99 = _pct(direct["latencies_ms"], 0.5), _pct(direct["latencies_ms"], 0.99)
                    p50, p99 = _pct(proxied["latencies_ms"], 0.5), _pct(proxied["latencies_ms"], 0.99)
                    print(
                        f"| {conc} | {'yes' if stream else 'no'} | {len(proxied['latencies_ms'])} "
                        f"| {d50:.2f} / {d99:.2f} | {p50:.2f} / {p99:.2f} | {p50 - d50:.2f} / {p99 - d99:.2f} "
                        f"| {len(proxied['latencies_ms']) / proxied['wall_s']:.0f} "
                        f"| {per['proxy']:.3f} / {per['upstream']:.3f} / {per['client']:.3f} "
                        f"| {_busy_cell(_busy(proxied))} | {direct['failed']} / {proxied['failed']} |"
                    )
            print()
            print(
                "| open loop, 40 sessions | stream | offered req/s | answered req/s | latency p50 / p99 ms "
                "| CPU ms/req proxy / upstream / client | busy proxy / upstream / client | CPU-bound | failed |"
            )
            print("|---|:---:|---:|---:|---:|---:|---:|---|---:|")
            for stream in (False, True):
                n = int(rate * seconds) // 40 * 40
                spec = {"sessions": 40, "requests": n, "stream": stream, "rate": rate, "warm": 5}
                res = load({**spec, "url": proxy_url, "model": "advisor"}, watch)
                ok = len(res["latencies_ms"])
                per = {k: v * 1000 / max(1, ok + res["failed"]) for k, v in res["cpu"].items()}
                busy = _busy(res)
                print(
                    f"| proxied | {'yes' if stream else 'no'} | {rate:.0f} | {ok / res['wall_s']:.0f} "
                    f"| {_pct(res['latencies_ms'], 0.5):.2f} / {_pct(res['latencies_ms'], 0.99):.2f} "
                    f"| {per['proxy']:.3f} / {per['upstream']:.3f} / {per['client']:.3f} "
                    f"| {_busy_cell(busy)} | {_bound(busy)} | {res['failed']} |"
                )
        finally:
            for proc in (px, up):
                proc.terminate()
                proc.wait(timeout=30)
    load_after = os.getloadavg()[0]
    print(
        f"(cores: {os.cpu_count()}, load average {load_before:.1f} before, {load_after:.1f} after; proxy on "
        f"{_server_stack()}, upstream calls on {client}; the client, the proxy and the upstream are separate processes sharing the "
        f"cores; busy: CPU seconds per wall second, of one core; CPU-bound: busy {100 * _BOUND:.0f}% or more)"
    )
    return 0
