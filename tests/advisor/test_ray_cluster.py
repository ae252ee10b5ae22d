"""Runs and evals on a real Ray cluster on this machine: a head node and a second node, each a `ray start
--block` process with its own resources and stopped by its PID, the tests' process as the driver, and a
ScriptedServer on 127.0.0.1 as the model.

The nodes run on 127.0.0.2: Ray replaces 127.0.0.1 and `localhost` with the machine's outward address, and
these tests talk to loopback addresses only.

- a 20-task suite gives the same results, calls and costs as a local run, and its tasks ran on both nodes;
  a second `advisor eval` with the same --out runs only what is missing;
- an endpoint limit of 2 and a run budget hold across the cluster under 20 concurrent tasks;
- a coding task's workspace goes to the worker and its diff comes back;
- a node killed mid-suite: every task finishes, the dead attempts' calls are booked as aborted spend,
  their traces kept under .aborted/, nothing lost or counted twice;
- an unreachable address: one line naming it, exit 2, before any model call.

Nothing here waits on a clock: the scripted model holds requests until the state a test needs is there
(tasks in flight, traces written), with generous timeouts that only a broken run reaches.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

# Ray's token authentication, on, with a token of this module's own (a ~/.ray/auth_token left by another
# Ray on this machine changes nothing here). Set before Ray is imported: Ray reads it once, at import.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(AUTH)
ray = pytest.importorskip("ray")

from advisor.evals.coding import build  # noqa: E402
from advisor.tools.commands import bwrap_problem  # noqa: E402

from advisor.cli import main  # noqa: E402
from advisor.cluster import connect  # noqa: E402
from advisor.testing import Reply, ScriptedServer, ScriptedToolCall, ScriptedUsage  # noqa: E402
from advisor.trace import read_trace  # noqa: E402

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
HOST = "127.0.0.2"  # the nodes' address
NODE_CPUS = 10  # logical CPUs per node: 20 tasks run at once over the two nodes
EXEC_USAGE = ScriptedUsage(prompt_tokens=1000, cached_tokens=400, completion_tokens=50, reasoning_tokens=10)
FRONTIER_USAGE = ScriptedUsage(prompt_tokens=2000, completion_tokens=300)
FLASH = {"input": 0.20, "cached_input": 0.04, "output": 1.15}
FRONTIER = {"input": 5.0, "cached_input": 0.5, "output": 25.0}
ID = re.compile(r"Task (t\d+):")


def wait_for(what: str, cond, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Node:
    """One `ray start --block` process (head or worker node), in a process group of its own."""

    def __init__(self, args: list[str], log: Path, resource: str):
        self.resource = resource
        env = {**os.environ, **AUTH}
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [RAY, "start", "--block", f"--node-ip-address={HOST}", "--disable-usage-stats",
             f"--num-cpus={NODE_CPUS}", f'--resources={{"{resource}": 100}}',
             "--object-store-memory=100000000", *args],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )

    @property
    def node_id(self) -> str | None:
        for n in ray.nodes():
            if n.get("Alive") and self.resource in n.get("Resources", {}):
                return n["NodeID"]
        return None

    def descendants(self) -> list[int]:
        """The PIDs under the node's process (its GCS, raylet, and the raylet's worker processes, which
        Ray starts in process groups of their own)."""
        children: dict[int, list[int]] = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        found, todo = [], [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                found.append(child)
                todo.append(child)
        return found

    def kill(self) -> None:
        """The node dies at once, workers and all, as when its machine is lost."""
        for pid in [self.proc.pid, *self.descendants()]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.stop()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)  # the node's raylet and workers are in its group
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        try:  # whatever of the group is left (a GCS server outlives `ray start` on SIGTERM)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=30)
        self.log.close()


@dataclass
class Cluster:
    address: str
    head: Node
    second: Node
    tmp: Path

    def join(self, resource: str) -> Node:
        """Another node, joined to the head; started and alive when this returns."""
        node = Node([f"--address={self.address}"], self.tmp / f"{resource}.log", resource)
        wait_for(f"node {resource} to join", lambda: node.node_id is not None)
        return node


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths must fit in 107 bytes: a short folder right under /tmp
    tmp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    port = free_port()
    address = f"{HOST}:{port}"
    head = Node(
        ["--head", f"--port={port}", f"--temp-dir={tmp}", "--include-dashboard=false"], tmp / "head.log", "head"
    )
    nodes = [head]
    try:
        wait_for("the head node", lambda: _answers(port))
        connect(address)  # this process is the driver of every test here
        nodes.append(Node([f"--address={address}"], tmp / "second.log", "second"))
        wait_for("the second node to join", lambda: nodes[1].node_id is not None)
        yield Cluster(address, head, nodes[1], tmp)
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            node.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _answers(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
        return True
    except OSError:
        return False


# -- the 20-task suite, local against Ray -----------------------------------------------------------------

TASKS = {f"t{i:02d}": (str(100 + i * 7), i % 3 == 0) for i in range(20)}  # id -> (answer, hard)


def task_id(body: dict) -> str:
    return ID.search(json.dumps(body)).group(1)


def executor(body: dict) -> Reply:
    answer, hard = TASKS[task_id(body)]
    if hard and "ADVICE" not in json.dumps(body):
        answer = "-1"  # the executor alone gets the hard ones wrong
    return Reply(text=f"Answer: {answer}", usage=EXEC_USAGE)


def frontier(body: dict) -> Reply:
    answer, _ = TASKS[task_id(body)]
    return Reply(text=f"ADVICE: the answer is {answer}.\nAnswer: {answer}", usage=FRONTIER_USAGE)


def write_suite(
    tmp: Path, server: ScriptedServer, tasks: dict, task_usd: float = 1.0, wall_s: float = 300, **flash
) -> Path:
    d = tmp / "suite"
    d.mkdir(exist_ok=True)
    rows = [{"name": t, "prompt": f"Task {t}: give the number.", "answer": a} for t, (a, _) in tasks.items()]
    (d / "tasks.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = {
        "name": "scripted",
        "endpoints": {
            "flash": {"provider": "openai", "base_url": server.base_url, "model": "flash", "price": FLASH,
                      "max_retries": 0, **flash},
            "frontier": {"provider": "openai", "base_url": server.base_url, "model": "frontier",
                         "price": FRONTIER, "max_retries": 0},
        },
        "defaults": {
            "executor": {"endpoint": "flash"},
            "frontier": {"endpoint": "frontier"},
            "escalation": {"after_failures": 5, "at": ["replan"], "max_consults": 2},
            "budget": {"max_usd": task_usd, "max_steps": 6, "max_wall_s": wall_s},
            "check": {"max_attempts": 2},
        },
        "tasks": ["tasks.jsonl"],
    }
    (d / "suite.yaml").write_text(yaml.safe_dump(suite))
    return d / "suite.yaml"


def run_eval(suite: Path, out: Path, *extra: str, strategies: str = "executor,advisor") -> int:
    return main(["eval", str(suite), "--strategies", strategies, "--concurrency", "20", "--out", str(out),
                 "--quiet", *extra])


def results(out: Path) -> dict[str, dict]:
    return {
        f"{p.parent.parent.name}/{p.parent.name}": json.loads(p.read_text())
        for p in sorted(out.glob("*/*/result.json"))
    }


def calls(trace: Path) -> list[tuple]:
    return [
        (e["role"], e["purpose"], e["endpoint"], json.dumps(e["usage"], sort_keys=True), e["cost_usd"], e["error"])
        for e in read_trace(trace)
        if e["type"] == "model_call"
    ]


WHERE = ("wall_s", "ray_node", "hostname")


def test_suite_on_two_nodes_matches_a_local_run_and_resumes(cluster, tmp_path):
    with ScriptedServer({"flash": executor, "frontier": frontier}) as server:
        suite = write_suite(tmp_path, server, TASKS)
        assert run_eval(suite, tmp_path / "local") == 0
        local_requests = len(server.requests)
        assert run_eval(suite, tmp_path / "ray", "--ray", cluster.address) == 0
        assert len(server.requests) == 2 * local_requests

        here, there = results(tmp_path / "local"), results(tmp_path / "ray")
        assert len(here) == 40 and set(here) == set(there)
        for key, r in here.items():
            assert {k: v for k, v in there[key].items() if k not in WHERE} == {
                k: v for k, v in r.items() if k not in WHERE
            }, key
            assert "ray_node" not in r and there[key]["hostname"] == socket.gethostname()
            assert calls(tmp_path / "ray" / key / "trace.jsonl") == calls(tmp_path / "local" / key / "trace.jsonl")
        assert {r["ray_node"] for r in there.values()} == {cluster.head.node_id, cluster.second.node_id}
        a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "ray"))
        for s in ("executor", "advisor"):
            assert {k: v for k, v in a["stats"][s].items() if k != "latency_s"} == {
                k: v for k, v in b["stats"][s].items() if k != "latency_s"
            }
        assert a["stats"]["advisor"]["solved"] == 20 and a["stats"]["executor"]["solved"] == 13

        # the driver killed mid-eval and started again: a lost result and a half-written task run again,
        # nothing else does
        out = tmp_path / "ray"
        (out / "advisor" / "t03" / "result.json").unlink()
        (out / "executor" / "t05" / "result.json").unlink()
        before = len(server.requests)
        assert run_eval(suite, out, "--ray", cluster.address) == 0
        again = server.requests[before:]
        assert {task_id(r.body) for r in again} == {"t03", "t05"}
        assert len(list((out / ".aborted" / "advisor").iterdir())) == 1
        assert json.loads((out / "results.json").read_text())["stats"]["advisor"]["solved"] == 20


# -- limits held cluster-wide -------------------------------------------------------------------------------


def test_endpoint_limit_and_run_budget_hold_across_the_cluster(cluster, tmp_path):
    """20 tasks at once over two nodes; flash takes 2 calls at a time; the eval may spend $5 and each
    call costs $1 (every answer is wrong, so without the budget each task would make 2 calls)."""
    dollar = ScriptedUsage(prompt_tokens=1_000_000, completion_tokens=0)
    out = tmp_path / "out"
    seen = {"started": 0}

    def running() -> int:  # tasks whose loop has started in a worker (their task_start reached the driver)
        return sum(1 for t in out.glob("executor/*/trace.jsonl") if read_trace(t)[:1])

    def flash(body: dict) -> Reply:
        if not seen["started"]:  # the first calls wait until every task runs and a second call came
            wait_for("20 tasks running", lambda: running() == 20, timeout_s=600)
            seen["started"] = running()
            # the peak, not the count now: the other calls come and go between two looks at it
            wait_for("a second call in flight", lambda: server.peak_in_flight("flash") >= 2, timeout_s=600)
        return Reply(text="Answer: wrong", usage=dollar)

    with ScriptedServer({"flash": flash, "frontier": frontier}) as server:
        suite = write_suite(
            tmp_path,
            server,
            TASKS,
            task_usd=100.0,  # the eval's budget stops them, not their own
            wall_s=900,  # nor their clock, however long 20 worker processes take to start here,
            timeout_s=900,  # and the first call, held until they all run, is not timed out by the client
            price={"input": 1.0, "cached_input": 1.0, "output": 0.0},
            max_concurrency=2,
        )
        run_eval(suite, out, "--ray", cluster.address, "--max-usd", "5", strategies="executor")
        n_calls = len(server.requests)
        assert seen["started"] == 20
        assert server.peak_in_flight("flash") == 2  # never more, and the limit was reached
    res = results(out)
    assert len(res) == 20
    spent = sum(r["cost_usd"]["total"] for r in res.values())
    traced = sum(c[4] for key in res for c in calls(out / key / "trace.jsonl"))
    assert spent == pytest.approx(traced) == pytest.approx(n_calls * 1.0)
    assert 5.0 <= spent <= 5.0 + 2  # over by at most the calls in flight (the endpoint allows 2)
    stopped = [r for r in res.values() if r["outcome"] == "budget_exceeded"]
    assert all("run max_usd 5.0 reached" in r["error"] for r in stopped)
    assert len(stopped) >= 20 - 3  # at most 3 tasks made their two calls (and failed) within 7 calls
    assert all(r["outcome"] == "failed" and r["model_calls"] == 2 for r in res.values() if r not in stopped)
    assert len({r["ray_node"] for r in res.values()}) == 2


# -- a coding task's workspace goes out and its diff comes back --------------------------------------------


def test_coding_task_diff_comes_back_from_a_worker(cluster, tmp_path):
    name = "default-000"
    src = ROOT / "evals" / "suites" / "coding" / "tasks" / name
    shutil.copytree(src, tmp_path / name)
    _, bug = build("default", 0)
    ((path, fixed),) = bug.fixed.items()
    fix = {"path": path, "old_text": bug.files[path], "new_text": fixed}

    def flash(body: dict) -> Reply:
        if not any(m["role"] == "tool" for m in body["messages"]):
            return Reply(tool_calls=[ScriptedToolCall("edit_file", fix)])
        return Reply(text="Answer: DONE")

    with ScriptedServer({"flash": flash, "frontier": ["unused"]}) as server:
        task = yaml.safe_load((tmp_path / name / "task.yaml").read_text())
        task["shell"] = {"sandbox": "bwrap" if bwrap_problem() is None else "limits"}
        task["endpoints"] = {
            "flash": server.endpoint_config("flash").model_dump(exclude_none=True),
            "frontier": server.endpoint_config("frontier").model_dump(exclude_none=True),
        }
        (tmp_path / name / "task.yaml").write_text(yaml.safe_dump(task))
        runs = tmp_path / "runs"
        rc = main(["run", str(tmp_path / name / "task.yaml"), "--runs-dir", str(runs), "--strategy", "executor",
                   "--ray", cluster.address])
    assert rc == 0
    (result,) = [json.loads(p.read_text()) for p in runs.glob("*/*/result.json")]
    assert result["outcome"] == "passed", result["error"]
    assert result["workspace_diff"] == (src / "reference.patch").read_text()
    assert result["ray_node"] in (cluster.head.node_id, cluster.second.node_id)
    assert (tmp_path / name / "repo" / path).read_text() == bug.files[path]  # the original is untouched


def test_the_offline_quickstart_runs_its_embedded_models_in_a_worker(cluster, tmp_path):
    # provider: embedded on Ray: the worker loads the shipped models itself (no weights travel) and the run is
    # the same as a local one, call for call and cent for cent
    task = ROOT / "examples" / "quickstart" / "task.yaml"
    outs = {}
    for where, extra in (("local", []), ("ray", ["--ray", cluster.address])):
        runs = tmp_path / where
        assert main(["run", str(task), "--runs-dir", str(runs), *extra]) == 0
        (path,) = runs.glob("*/*/result.json")
        outs[where] = json.loads(path.read_text())
    local, remote = outs["local"], outs["ray"]
    assert remote["outcome"] == "passed" and remote["ray_node"] in (cluster.head.node_id, cluster.second.node_id)
    for key in ("answer", "steps", "consults", "model_calls", "tokens", "cost_usd"):
        assert remote[key] == local[key], key


# -- a node dies mid-suite ------------------------------------------------------------------------------------


def test_killed_node_tasks_run_again_elsewhere_and_its_spend_is_booked(cluster, tmp_path):
    """12 tasks over three nodes; each answers wrong once (a billed call), then holds its second call
    until the test has killed the third node; its tasks run again on the two left."""
    victim = cluster.join("victim")
    victim_id = victim.node_id
    out = tmp_path / "out"
    go = threading.Event()
    tasks = {t: TASKS[t] for t in list(TASKS)[:12]}
    held: list[str] = []

    def flash(body: dict) -> Reply:
        answer, _ = tasks[task_id(body)]
        if "is not correct" not in json.dumps(body):
            return Reply(text="Answer: -1", usage=EXEC_USAGE)
        if not go.is_set():
            held.append(task_id(body))
            go.wait(timeout=300)
        return Reply(text=f"Answer: {answer}", usage=EXEC_USAGE)

    def on_victim() -> list[str]:
        found = []
        for trace in out.glob("executor/*/trace.jsonl"):
            start = read_trace(trace)[:1]
            if start and start[0].get("ray_node") == victim_id:
                found.append(trace.parent.name)
        return found

    killed: list[str] = []

    def kill_when_all_wait() -> None:
        try:  # every task has had its first answer rejected and is waiting on its second call
            wait_for("12 held calls", lambda: len(held) == 12, timeout_s=240)
            killed.extend(sorted(on_victim()))
            victim.kill()
        finally:
            go.set()

    try:
        with ScriptedServer({"flash": flash, "frontier": frontier}) as server:
            suite = write_suite(tmp_path, server, tasks)
            killer = threading.Thread(target=kill_when_all_wait)
            killer.start()
            rc = run_eval(suite, out, "--ray", cluster.address, strategies="executor")  # the driver
            killer.join()
            requests = len(server.requests)
    finally:
        go.set()
        victim.kill()
    assert killed, "no task was placed on the third node"
    assert rc == 0
    res = results(out)
    assert len(res) == 12 and all(r["outcome"] == "passed" for r in res.values())
    for key, r in res.items():
        final = calls(out / key / "trace.jsonl")
        assert r["model_calls"] == len(final) == 2
        assert r["cost_usd"]["total"] == pytest.approx(sum(c[4] for c in final))
        assert r["ray_node"] != victim_id
        if key.split("/")[1] in killed:
            a = r["aborted"]
            (dead,) = a["traces"]
            dead_calls = calls(out / dead / "trace.jsonl")
            assert a["attempts"] == 1 and a["model_calls"] == len(dead_calls) == 1  # the rejected answer
            assert a["cost_usd"] == pytest.approx(sum(c[4] for c in dead_calls))
            assert a["cost_usd"] > 0
            assert read_trace(out / dead / "trace.jsonl")[0]["ray_node"] == victim_id
        else:
            assert "aborted" not in r
    # every request the server answered is in exactly one trace, except the calls the dead node was
    # waiting on when it died (answered to nobody: their usage was never reported)
    traced = sum(len(calls(p)) for p in out.rglob("trace.jsonl"))
    assert requests == traced + len(killed)
    report = json.loads((out / "results.json").read_text())
    assert report["stats"]["executor"]["aborted_usd"] == pytest.approx(
        sum(r["aborted"]["cost_usd"] for r in res.values() if "aborted" in r)
    )


# -- the driver killed mid-eval ------------------------------------------------------------------------------


def test_driver_killed_mid_eval_resumes_with_only_what_is_missing(cluster, tmp_path):
    """An `advisor eval --ray` process killed (SIGKILL) while half its tasks wait on the model; the same
    command again runs only those."""
    out = tmp_path / "out"
    tasks = {t: TASKS[t] for t in list(TASKS)[:6]}
    slow = {"t03", "t04", "t05"}
    go = threading.Event()
    held: list[str] = []

    def flash(body: dict) -> Reply:
        tid = task_id(body)
        if tid in slow and not go.is_set():
            held.append(tid)
            go.wait(timeout=300)
        return Reply(text=f"Answer: {tasks[tid][0]}", usage=EXEC_USAGE)

    with ScriptedServer({"flash": flash, "frontier": frontier}) as server:
        suite = write_suite(tmp_path, server, tasks)
        driver = subprocess.Popen(
            [sys.executable, "-m", "advisor.cli", "eval", str(suite), "--strategies", "executor", "--out",
             str(out), "--quiet", "--concurrency", "6", "--ray", cluster.address],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_for("3 tasks done and 3 waiting", lambda: len(list(out.glob("executor/*/result.json"))) == 3
                     and len(held) == 3)
        finally:
            driver.kill()
            driver.wait(timeout=60)
            go.set()
        before = len(server.requests)
        assert run_eval(suite, out, "--ray", cluster.address, strategies="executor") == 0
        again = {task_id(r.body) for r in server.requests[before:]}
    assert again == slow
    res = results(out)
    assert len(res) == 6 and all(r["outcome"] == "passed" for r in res.values())
    assert sorted(p.name.split("-")[0] for p in (out / ".aborted" / "executor").iterdir()) == sorted(slow)


# -- an unreachable cluster ------------------------------------------------------------------------------------


def test_unreachable_cluster_is_one_line_and_exit_2(tmp_path):
    port = free_port()  # nothing listens there
    with ScriptedServer({"flash": ["Answer: 1"]}) as server:
        task = {
            "name": "t", "goal": "Answer 1.", "executor": {"endpoint": "flash"},
            "endpoints": {"flash": server.endpoint_config("flash").model_dump(exclude_none=True)},
        }
        (tmp_path / "task.yaml").write_text(yaml.safe_dump(task))
        proc = subprocess.run(
            [sys.executable, "-m", "advisor.cli", "run", str(tmp_path / "task.yaml"), "--runs-dir",
             str(tmp_path / "runs"), "--ray", f"{HOST}:{port}"],
            capture_output=True, text=True, timeout=120, env={**os.environ, "RAY_ADDRESS": ""},
        )
        assert not server.requests
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: Ray cluster at {HOST}:{port} cannot be reached: Connection refused"
