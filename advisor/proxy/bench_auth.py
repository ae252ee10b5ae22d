"""What keys cost a request: `python -m advisor.bench --proxy --auth [--pg-url-env NAME]`.

The same zero-latency upstream and load generator as `advisor.proxy.bench`, and in one run side by side:
the upstream direct, the proxy without auth, the proxy with auth and a virtual key with a budget on
SQLite (each call's budget reserved and its start recorded in the database before the upstream call,
settled after), and, when `--pg-url-env` names a variable holding a postgresql:// URL, the same on
PostgreSQL. Non-streamed, at 1 and 40 concurrent sessions. The figure to read is the added p50 at one
session and its ratio to the proxy without auth.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from advisor.proxy.bench import _free_port, _pct, _proxy_config, _wait, load

MASTER_ENV = "ADVISOR_BENCH_MASTER_KEY"
KEY_ENV = "ADVISOR_BENCH_KEY"


def _variant_config(tmp: Path, up_port: int, name: str, pg_env: str | None) -> Path:
    d = tmp / name
    d.mkdir()
    base = _proxy_config(d, up_port)
    cfg = yaml.safe_load(base.read_text())
    if name != "off":
        cfg["auth"] = {"master_key_env": MASTER_ENV}
    if name == "postgresql":
        cfg["storage"] = {"url_env": pg_env}
    base.write_text(yaml.safe_dump(cfg))
    return base


def _make_key(port: int) -> str:
    body = json.dumps({"name": f"bench-{secrets.token_hex(4)}", "max_usd": 1e6, "period": "day"}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/admin/keys",
        data=body,
        headers={"Authorization": f"Bearer {os.environ[MASTER_ENV]}", "content-type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())["key"]


def main(requests: int = 2000, pg_url_env: str | None = None) -> int:
    load_before = os.getloadavg()[0]
    os.environ[MASTER_ENV] = secrets.token_urlsafe(32)
    variants = ["off", "sqlite"] + (["postgresql"] if pg_url_env else [])
    procs: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        up_port = _free_port()
        up = subprocess.Popen([sys.executable, "-m", "advisor.proxy.bench_upstream", str(up_port)])
        procs.append(up)
        env = {**os.environ, "ADVISOR_CONFIG_DIR": str(Path(tmp) / "no-config")}
        ports, keys, pids = {}, {}, {}
        try:
            _wait(up_port, "/", up)
            for name in variants:
                ports[name] = _free_port()
                config = _variant_config(Path(tmp), up_port, name, pg_url_env)
                px = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "advisor.cli",
                        "proxy",
                        "--config",
                        str(config),
                        "--port",
                        str(ports[name]),
                    ],
                    env=env,
                    stderr=subprocess.DEVNULL,
                )
                procs.append(px)
                pids[name] = px.pid
                _wait(ports[name], "/health", px)
                keys[name] = _make_key(ports[name]) if name != "off" else None
            print(
                "| sessions | proxy | direct p50 / p99 ms | proxied p50 / p99 ms | added p50 / p99 ms "
                "| added p50 vs no auth | proxied req/s | proxy CPU ms/req | failed |"
            )
            print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
            for conc in (1, 40):
                n = requests if conc > 1 else requests // 4
                spec = {"sessions": conc, "requests": n, "stream": False}
                direct_url = f"http://127.0.0.1:{up_port}/v1/chat/completions"
                direct = load({**spec, "url": direct_url, "model": "flash"}, {"upstream": up.pid})
                d50, d99 = _pct(direct["latencies_ms"], 0.5), _pct(direct["latencies_ms"], 0.99)
                added_off = None
                for name in variants:
                    if keys[name]:
                        os.environ[KEY_ENV] = keys[name]
                    url = f"http://127.0.0.1:{ports[name]}/v1/chat/completions"
                    key_spec = {"key_env": KEY_ENV} if keys[name] else {}
                    res = load({**spec, **key_spec, "url": url, "model": "advisor"}, {"proxy": pids[name]})
                    ok = len(res["latencies_ms"])
                    p50, p99 = _pct(res["latencies_ms"], 0.5), _pct(res["latencies_ms"], 0.99)
                    added = p50 - d50
                    if name == "off":
                        added_off = added
                    ratio = f"{added / added_off:.2f}x" if added_off and name != "off" else "-"
                    label = "no auth" if name == "off" else f"virtual key with a budget, {name}"
                    print(
                        f"| {conc} | {label} | {d50:.2f} / {d99:.2f} | {p50:.2f} / {p99:.2f} "
                        f"| {added:.2f} / {p99 - d99:.2f} | {ratio} | {ok / res['wall_s']:.0f} "
                        f"| {res['cpu']['proxy'] * 1000 / max(1, ok + res['failed']):.3f} | {res['failed']} |"
                    )
        finally:
            for proc in reversed(procs):
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            time.sleep(0)
    print(
        f"(cores: {os.cpu_count()}, load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after; "
        "each proxy its own process; the client, the proxies and the upstream share the cores)"
    )
    return 0
