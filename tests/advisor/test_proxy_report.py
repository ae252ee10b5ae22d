"""proxy.yaml loading, `advisor proxy` as a process, `advisor proxy report`, and the page at `/`."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from advisor.cli import main
from advisor.messages import Usage
from advisor.proxy.config import load_proxy_config
from advisor.task import TaskError
from advisor.testing import Reply, ScriptedServer, ScriptedUsage
from tests.advisor.proxy_helpers import EXEC_PRICE, FRONTIER_PRICE, make_config, proxy_for


def _yaml(upstream: ScriptedServer, tmp_path, **over) -> str:
    doc = {
        "models": ["advisor"],
        "executor": {"endpoint": "flash"},
        "frontier": {"endpoint": "big"},
        "escalation": {"after_failures": 1, "at": ["plan"], "mode": "advise"},
        "budget": {"max_usd": 2.0, "max_usd_per_day": 10},
        "sessions": {"dir": "state", "fsync": False},
        "endpoints": {
            "flash": {
                "provider": "openai",
                "model": "flash",
                "base_url": upstream.base_url,
                "price": EXEC_PRICE.model_dump(),
            },
            "big": {
                "provider": "anthropic",
                "model": "big",
                "base_url": upstream.anthropic_base_url,
                "price": FRONTIER_PRICE.model_dump(),
            },
        },
        **over,
    }
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_proxy_yaml_errors_are_one_line_naming_the_field(tmp_path, capsys, monkeypatch):
    with ScriptedServer() as upstream:
        with pytest.raises(TaskError, match=r"proxy.yaml: escalation.at.0: .*'plan' or 'new_user_turn'"):
            load_proxy_config(_yaml(upstream, tmp_path, escalation={"at": ["final"]}))
        with pytest.raises(TaskError, match=r"executor.endpoint: unknown endpoint 'nope'"):
            load_proxy_config(_yaml(upstream, tmp_path, executor={"endpoint": "nope"}))
        with pytest.raises(TaskError, match=r"escalation.error_patterns: .*not a valid regex"):
            load_proxy_config(_yaml(upstream, tmp_path, escalation={"error_patterns": ["(unclosed"]}))
        cfg = load_proxy_config(_yaml(upstream, tmp_path))
        doc = yaml.safe_load((tmp_path / "proxy.yaml").read_text())
        doc["endpoints"]["big"]["api_key_env"] = "ADVISOR_TEST_UNSET_KEY"
        (tmp_path / "keyed.yaml").write_text(yaml.safe_dump(doc))
        monkeypatch.delenv("ADVISOR_TEST_UNSET_KEY", raising=False)
        assert main(["proxy", "--config", str(tmp_path / "keyed.yaml")]) == 2
        assert "ADVISOR_TEST_UNSET_KEY is not set" in capsys.readouterr().err
    assert cfg.sessions_dir == tmp_path / "state"
    assert main(["proxy", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert cfg.escalation.after_failures == 1 and cfg.budget.max_usd_per_day == 10


def test_report_md_html_and_page_show_tokens_usd_consults_and_frontier_only(tmp_path):
    with ScriptedServer() as upstream:
        upstream.script(
            "flash", lambda body: Reply(text="ok", usage=ScriptedUsage(1000, 100, cached_tokens=400))
        )
        upstream.script("big", [Reply(text="plan: go", usage=ScriptedUsage(300, 30))])
        cfg = make_config(upstream, tmp_path, escalation={"at": ["plan"]})
        with proxy_for(cfg) as proxy:
            url = f"{proxy.base_url}/chat/completions"
            body = {"model": "advisor", "messages": [{"role": "user", "content": "hi"}]}
            httpx.post(url, json=body, headers={"x-advisor-session": "alpha"})
            httpx.post(url, json=body, headers={"x-advisor-session": "alpha"})
            page = httpx.get(f"{proxy.root_url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<h1>Proxy report</h1>" in page.text and "alpha" in page.text and "plan 1" in page.text
    from advisor.proxy.report import write_report

    store = proxy.router.store
    res = write_report(store, tmp_path / "out")
    s = res["sessions"][0]
    exec_usage = Usage(input=600, cached_input=400, output=100)
    assert s["calls"] == {"executor": 2, "frontier": 1}
    assert s["tokens"]["executor"]["input"] == 1200 and s["tokens"]["frontier"]["output"] == 30
    assert s["cost_usd"]["executor"] == pytest.approx(2 * EXEC_PRICE.cost(exec_usage))
    frontier_only = 2 * FRONTIER_PRICE.cost(exec_usage) + FRONTIER_PRICE.cost(Usage(input=300, output=30))
    assert s["cost_usd"]["frontier_only_estimate"] == pytest.approx(frontier_only)
    assert s["consults"][0]["trigger"] == "plan" and s["consults"][0]["kind"] == "advice"
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith("# Proxy report") and "| alpha | 2 | 2 / 1 |" in md and "## Escalation ledger" in md
    assert "<table>" in (tmp_path / "out" / "report.html").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["total"]["consults"] == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_advisor_proxy_command_serves_and_advisor_proxy_report_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVISOR_CONFIG_DIR", str(tmp_path / "none"))
    with ScriptedServer() as upstream:
        upstream.script("flash", lambda body: "hello")
        upstream.script("big", lambda body: "a plan")
        config = _yaml(upstream, tmp_path)
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "advisor.cli", "proxy", "--config", config, "--port", str(port)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline
                time.sleep(0.2)
            r = httpx.post(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json={"model": "advisor", "messages": [{"role": "user", "content": "hey"}]},
            )
            assert r.status_code == 200 and r.headers["x-advisor-consult"] == "plan=advice"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert main(["proxy", "report", "--config", config, "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "1 sessions, 1 requests" in md and "plan 1" in md


def test_advisor_proxy_on_a_taken_port_is_one_line_exit_2(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVISOR_CONFIG_DIR", str(tmp_path / "none"))
    with ScriptedServer() as upstream, socket.socket() as taken:
        config = _yaml(upstream, tmp_path)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "advisor.cli", "proxy", "--config", config, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.strip().splitlines()
    assert line == f"error: cannot listen on 127.0.0.1:{port}: Address already in use"


def _report_with_long_session_ids() -> dict:
    usage = {"input": 1234567, "cached_input": 7654321, "cache_write": 0, "output": 98765, "reasoning": 12345}
    sessions = [
        {
            "session": f"claude-code:{i:02d}5f3c2a9e-41d7-4c1b-9a8e-7f0d2c6b1e4{i}" if i % 2 else "sha256:" + "9f1c2e7a" * 8,
            "requests": 120 + i,
            "calls": {"executor": 118 + i, "frontier": 4},
            "tokens": {"executor": usage, "frontier": usage},
            "cost_usd": {"executor": 0.81, "frontier": 3.12, "total": 3.93, "frontier_only_estimate": 41.2},
            "consults": [{"trigger": "failures", "kind": "advice", "request": 17, "cost_usd": 0.4}],
        }
        for i in range(4)
    ]
    total = {**sessions[0], "sessions": 4, "consults": 4, "skipped_consults": 0, "spent_by_day": {}}
    return {"sessions": sessions, "total": total}


def test_the_report_page_fits_a_1280_pixel_window(tmp_path):
    # real harness session ids are long: measured in a real browser, the page needs no horizontal scroll
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium here (.ci/run installs Debian's)")
    from advisor.proxy.report import render_html

    page = render_html(_report_with_long_session_ids()).replace(
        "</body>",
        "<script>document.body.setAttribute('data-width', document.documentElement.scrollWidth)</script></body>",
    )
    (tmp_path / "report.html").write_text(page)
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,900",
         "--dump-dom", (tmp_path / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    ).stdout  # fmt: skip
    width = int(re.search(r'data-width="(\d+)"', dom).group(1))
    assert width <= 1280
