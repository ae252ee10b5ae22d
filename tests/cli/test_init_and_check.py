"""`advisor init` presets load as they are (the embedded one runs offline), and `advisor check` against a
real scripted server, a server that is down, one that answers 401, and an unknown model."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import yaml

from advisor.cli import main
from advisor.pricing import known_price
from advisor.scaffold import PRESETS
from advisor.task import load_task
from advisor.testing import HTTPError, Reply, ScriptedServer, ScriptedUsage


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_writes_files_that_load_as_they_are(tmp_path, preset, monkeypatch, capsys):
    assert main(["init", str(tmp_path / "p"), "--preset", preset]) == 0
    task_text = (tmp_path / "p" / "task.yaml").read_text()
    ep_text = (tmp_path / "p" / "advisor.yaml").read_text()
    assert task_text.startswith("#") and ep_text.startswith("#")  # commented for a newcomer
    printed = capsys.readouterr().out
    keys = sorted(set(re.findall(r"api_key_env: (\w+)", ep_text)))
    assert (f"export {', '.join(keys)}, then:" in printed) == bool(keys)
    assert (preset == "embedded") == (not keys)
    for var in keys:
        monkeypatch.setenv(var, "sk-test-not-a-real-key")
    task = load_task(tmp_path / "p" / "task.yaml")  # what `advisor run` does first: validated, keys set
    for name in ("flash", "frontier"):
        cfg = task.endpoints[name]
        assert cfg.price is not None  # filled in from the price data
        assert "sk-" not in ep_text  # keys are variable names only
        if cfg.provider != "embedded":
            assert cfg.price == known_price(cfg.model)
    assert main(["init", str(tmp_path / "p"), "--preset", preset]) == 2  # never overwrites silently
    assert "already exists (pass --force" in capsys.readouterr().err


def test_the_embedded_preset_runs_offline(tmp_path, capsys):
    assert main(["init", str(tmp_path / "mine")]) == 0
    assert main(["run", str(tmp_path / "mine" / "task.yaml"), "--runs-dir", str(tmp_path / "runs")]) == 0
    assert "first-task" in capsys.readouterr().out


def _endpoints(tmp_path: Path, **eps: dict) -> Path:
    path = tmp_path / "advisor.yaml"
    path.write_text(yaml.safe_dump({"endpoints": eps}, sort_keys=False))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_check_reports_each_endpoint_on_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CHECK_KEY", "sk-secret-value-123")
    monkeypatch.delenv("MISSING_KEY", raising=False)
    usage = ScriptedUsage(prompt_tokens=12, completion_tokens=1)
    scripts = {
        "good": lambda body: Reply(text="OK", usage=usage),
        "claude": lambda body: Reply(text="OK", usage=usage),
        "locked": [HTTPError(401, "invalid x-api-key")],
    }
    price = {"input": 0.2, "cached_input": 0.04, "output": 1.15}
    with ScriptedServer(scripts) as server:
        path = _endpoints(
            tmp_path,
            good={"provider": "openai", "base_url": server.base_url, "model": "good", "api_key_env": "CHECK_KEY", "price": price},
            claude={"provider": "anthropic", "base_url": server.anthropic_base_url, "model": "claude", "api_key_env": "CHECK_KEY", "free": True},
            locked={"provider": "openai", "base_url": server.base_url, "model": "locked", "api_key_env": "CHECK_KEY", "price": price},
            unknown={"provider": "openai", "base_url": server.base_url, "model": "gpt-nine", "price": price},
            nokey={"provider": "openai", "base_url": server.base_url, "model": "good", "api_key_env": "MISSING_KEY", "price": price},
            down={"provider": "openai", "base_url": f"http://127.0.0.1:{_free_port()}/v1", "model": "good", "price": price},
            unpriced={"provider": "openai", "base_url": server.base_url, "model": "step-3.7-flash", "free": False},
        )
        code = main(["check", str(path)])
        out = capsys.readouterr().out
        one_token_calls = [r for r in server.requests if r.path.endswith(("/chat/completions", "/messages"))]
    assert code == 1
    lines = dict(line.split(": ", 1) for line in out.strip().splitlines())
    assert list(lines) == ["good", "claude", "locked", "unknown", "nokey", "down", "unpriced"]
    assert re.fullmatch(
        rf"ok: key variable CHECK_KEY set; server answers at {re.escape(server.base_url)}; model good listed; "
        r"one-token call \d+\.\d\d s, usage 12 in, 1 out; price \$0\.20 in / \$0\.04 cached / \$1\.15 out per M tokens",
        lines["good"],
    )
    assert lines["claude"].startswith("ok: key variable CHECK_KEY set; server answers")
    assert lines["claude"].endswith("usage 12 in, 1 out; free (free: true)")
    assert lines["locked"].startswith("FAILED: key variable CHECK_KEY set; server answers")
    assert "the server refused the key (HTTP 401" in lines["locked"]
    assert lines["unknown"].startswith("FAILED: no key (api_key_env not set); server answers")
    assert "model 'gpt-nine' not among the 3 the server lists (claude, good, locked)" in lines["unknown"]
    assert lines["nokey"] == (
        "FAILED: key variable MISSING_KEY is not set; price $0.20 in / $0.04 cached / $1.15 out per M tokens"
    )
    assert lines["down"].startswith("FAILED: no key (api_key_env not set); server not reachable at http://127.0.0.1:")
    assert lines["unpriced"].endswith(
        "no price (add price: {input, cached_input, output} or free: true; "
        "the list price is $0.20 in / $0.04 cached / $1.15 out per M tokens)"
    )
    assert "sk-secret-value-123" not in out
    # one one-token call each for good, claude and locked; none for the unknown model
    assert sorted(r.body["model"] for r in one_token_calls) == ["claude", "good", "locked"]
    assert all(r.body["max_tokens"] == 1 for r in one_token_calls)


def test_check_passes_when_every_endpoint_is_ready(tmp_path, capsys):
    with ScriptedServer({"m": lambda body: Reply(text="OK")}) as server:
        path = _endpoints(tmp_path, m={"provider": "openai", "base_url": server.base_url, "model": "m", "free": True})
        assert main(["check", str(path)]) == 0
        assert capsys.readouterr().out.startswith("m: ok: ")
        assert main(["endpoints", "check", str(path)]) == 0  # the same command, grouped
        assert capsys.readouterr().out.startswith("m: ok: ")


def test_check_of_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"
