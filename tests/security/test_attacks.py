"""A hostile model's attacks on the code tools (shell, python, command checks), in every sandbox mode here.

Each attack runs through the tools as a model would call them and asserts the host is untouched: the
marker file and the original repository outside the workspace, Unix-socket listeners on the host, a
dummy key in the parent's environment, and no process left behind. `limits` confines by uid: as root
it gets a uid of its own (files and sockets in closed folders hold), as a normal user it shares
advisor's (only the environment, syscalls and processes are checked there). The suite also runs as an
unprivileged user (test_the_suite_as_an_unprivileged_user), as CI runs it twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from advisor.tools.confine import bwrap_problem, is_root
from advisor.tools.registry import BUILTIN
from advisor.tools.shell import ShellSettings
from advisor.tools.spec import ToolContext

from advisor.checks import run_check
from advisor.task import Check, Shell

BWRAP = bwrap_problem()
ROOT = is_root()
SHELL, PY = BUILTIN["shell"], BUILTIN["python"]
MODES = [
    pytest.param("bwrap", marks=pytest.mark.skipif(BWRAP is not None, reason=f"no bwrap: {BWRAP}")),
    "limits",
]
if BWRAP:
    print(f"tests/security: the bwrap attacks are skipped: {BWRAP}", file=sys.stderr)


@pytest.fixture(params=MODES)
def mode(request):
    return request.param


def ctx_for(ws: Path, mode: str) -> ToolContext:
    return ToolContext(workspace=ws, extra={"shell": ShellSettings(sandbox=mode)})


def python_runs_as_sandbox_uid() -> bool:
    """Whether the python tool can run in limits mode here (as root its uid must reach this Python)."""
    from advisor.tools.confine import reachable_by_others

    return not ROOT or reachable_by_others(sys.executable)


def alive(marker: str) -> list[str]:
    """Live processes whose command line holds `marker` (zombies are dead)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
                if marker.encode() in cmd and (p / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
            except (OSError, IndexError):
                pass
    return out


def escape_script(host) -> str:
    socks = [str(x.address) for x in [host.private_socket, *host.path_sockets]]
    return f"""
mount -o remount,rw,bind / ; echo "remount=$?"
umount -l /tmp ; echo "umount=$?"
echo pwned > {host.marker} ; echo pwned > {host.dir}/pwned
echo pwned >> {host.repo}/app.py ; rm -f {host.repo}/README
echo pwned > /usr/advisor-pwned-{host.token} ; echo pwned > /etc/advisor-pwned-{host.token}
python3 - <<'PY'
import socket
for a in {socks!r} + [b"\\0advisor-attack-{host.token}"]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(a)
        print("connected", a)
    except OSError as e:
        print("refused", a, e)
PY
echo end
"""


def assert_host_files_held(host, mode: str) -> None:
    for top in ("/usr", "/etc"):
        assert not Path(f"{top}/advisor-pwned-{host.token}").exists()
    if mode == "bwrap" or ROOT:  # limits as a normal user runs as advisor's own uid: its files are fair game
        host.files_untouched()
        host.sockets_untouched(path=mode == "bwrap", abstract=mode == "bwrap")


async def test_shell_escape_leaves_the_host_untouched(ws, host, mode):
    r = await SHELL.invoke({"command": escape_script(host), "timeout_s": 60}, ctx_for(ws, mode))
    assert "end" in r.text, r.text
    assert "remount=0" not in r.text and "umount=0" not in r.text
    assert_host_files_held(host, mode)


async def test_command_check_runs_confined(ws, host, mode):
    """The agent leaves an escape in the workspace and the task's own check runs it."""
    (ws / "app.py").write_text("import subprocess, sys\nsubprocess.run(['bash', 'escape.sh'])\n")
    (ws / "escape.sh").write_text(escape_script(host) + "id -u\ngrep CapEff /proc/self/status\n")
    check = Check(type="command", run="python3 app.py", timeout_s=60)
    r = await run_check(check, "", ws, ws, Shell(sandbox=mode))
    assert "end" in r.detail, r.detail
    assert_host_files_held(host, mode)
    if ROOT or mode == "bwrap":
        assert "\n0\n" not in r.detail and "CapEff:\t0000000000000000" in r.detail


async def test_no_capabilities_no_new_privileges_and_a_seccomp_filter(ws, mode):
    r = await SHELL.invoke(
        {"command": "id -u; grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status"},
        ctx_for(ws, mode),
    )
    lines = dict(line.split(":\t") for line in r.text.splitlines()[1:6])
    uid = int(r.text.splitlines()[0])
    assert uid != 0 and lines["CapEff"] == lines["CapPrm"] == "0000000000000000", r.text
    assert lines["NoNewPrivs"] == "1" and lines["Seccomp"] == "2", r.text
    if mode == "bwrap":
        assert lines["CapBnd"] == "0000000000000000"


SYSCALLS = r"""
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
    ctypes.set_errno(0)
    ret = libc.syscall(nr, *[ctypes.c_long(a) for a in args])
    return "ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
print({
    "unshare_user": call(272, 0x10000000),
    "unshare_mount": call(272, 0x00020000),
    "ptrace_traceme": call(101, 0, 0, 0, 0),
    "keyctl_session": call(250, 0, -3, 0),
    "io_uring_setup": call(425, 1, 0),
    "bpf": call(321, 0, 0, 0),
    "setns": call(308, 0, 0),
    "mount": call(165, 0, 0, 0, 0, 0),
    "umount2": call(166, 0, 0),
    "pivot_root": call(155, 0, 0),
    "userfaultfd": call(323, 0),
    "clone_newuser": call(56, 0x10000000 | 17, 0, 0, 0, 0),
})
"""


@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers are x86_64's")
async def test_dangerous_syscalls_are_refused(ws, mode):
    r = await SHELL.invoke({"command": f"python3 - <<'PY'\n{SYSCALLS}\nPY"}, ctx_for(ws, mode))
    got = eval(r.text.splitlines()[0])  # noqa: S307 - our own script's dict literal
    assert set(got.values()) == {"EPERM"}, got


async def test_nothing_outlives_a_shell_call(ws, mode):
    tag = f"991.{os.getpid() % 1000:03d}"
    attack = f"""
for f in /sys/fs/cgroup/*/cgroup.procs; do echo $$ > $f; done 2>/dev/null
setsid sleep {tag}1 >/dev/null 2>&1 &
( setsid sh -c 'sleep {tag}2' & )
nohup sleep {tag}3 &
python3 -c "import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep({tag}4)
    os._exit(0)
"
echo started
"""
    r = await SHELL.invoke({"command": attack, "timeout_s": 60}, ctx_for(ws, mode))
    assert "started" in r.text and not r.data["timed_out"] and r.data["killed"] is None, r.text
    await asyncio.sleep(0.3)
    assert alive(tag) == []
    # and when the call times out with them running
    r = await SHELL.invoke({"command": attack + f"sleep {tag}5", "timeout_s": 2}, ctx_for(ws, mode))
    assert r.data["timed_out"]
    await asyncio.sleep(0.3)
    assert alive(tag) == []


async def test_nothing_outlives_a_python_call(ws, mode):
    if mode == "limits" and not python_runs_as_sandbox_uid():
        pytest.skip(f"limits as root: {sys.executable} is in a folder closed to other users")
    tag = f"992.{os.getpid() % 1000:03d}"
    code = f"""
import os, subprocess, sys, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep({tag}1)
    os._exit(0)
subprocess.Popen([sys.executable, "-c", "import time; time.sleep({tag}2)"], start_new_session=True)
print("started")
"""
    r = await PY.invoke({"code": code, "timeout_s": 60}, ctx_for(ws, mode))
    assert "started" in r.text and not r.data["timed_out"], r.text
    await asyncio.sleep(0.3)
    assert alive(tag) == []
    r = await PY.invoke({"code": code + f"time.sleep({tag}3)", "timeout_s": 2}, ctx_for(ws, mode))
    assert r.data["timed_out"]
    await asyncio.sleep(0.3)
    assert alive(tag) == []


_CHILD = r"""
import asyncio, sys
from pathlib import Path
from advisor.tools.commands import Limits, run_command
from advisor.tools.sandbox import run_python_async
mode, kind, ws, code = sys.argv[1:5]
async def main():
    if kind == "shell":
        r = await run_command(code, Path(ws), sandbox=mode, limits=Limits(timeout_s=60))
        print(r.stdout + r.stderr)
    else:
        print((await run_python_async(code, Path(ws), timeout_s=60, sandbox=mode)).output)
asyncio.run(main())
"""
READ_ENVIRONS = {  # every environment in reach, filtered to the key's line (the output is bounded)
    "shell": "for f in /proc/[0-9]*/environ /proc/[0-9]*/task/*/environ /proc/$PPID/environ; do "
    "tr '\\0' '\\n' < $f; done 2>/dev/null | grep -a ATTACK_API_KEY; echo end",
    "python": "import glob\nfor f in glob.glob('/proc/[0-9]*/environ'):\n"
    "    try:\n        env = open(f, 'rb').read()\n    except OSError:\n        continue\n"
    "    print([v for v in env.split(b'\\0') if b'ATTACK_API_KEY' in v])\nprint('end')",
}


def run_as_advisor_with_a_key(ws: Path, mode: str, kind: str) -> tuple[str, str]:
    """Run one tool call from a fresh advisor process whose environment (as exec'd) holds an API key."""
    key = "sk-attack-" + os.urandom(8).hex()
    env = dict(os.environ, ADVISOR_ATTACK_API_KEY=key)
    p = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, kind, str(ws), READ_ENVIRONS[kind]],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert "end" in p.stdout, p.stdout + p.stderr
    return key, p.stdout


@pytest.mark.parametrize("kind", ["shell", "python"])
def test_keys_in_the_parents_environment_are_out_of_reach(ws, mode, kind):
    if kind == "python" and mode == "limits" and not python_runs_as_sandbox_uid():
        pytest.skip(f"limits as root: {sys.executable} is in a folder closed to other users")
    key, out = run_as_advisor_with_a_key(ws, mode, kind)
    assert key not in out


def test_the_environ_attack_does_reach_an_unconfined_parent(ws):
    """The control: with `sandbox: none` the same read finds the key, so the test above can fail."""
    key, out = run_as_advisor_with_a_key(ws, "none", "shell")
    assert key in out


@pytest.mark.skipif(BWRAP is not None, reason=f"no bwrap: {BWRAP}")
async def test_bwrap_hides_host_processes_sockets_and_files(ws, host):
    tag = f"993.{os.getpid() % 1000:03d}"
    sleeper = subprocess.Popen(["sleep", tag])  # noqa: ASYNC220 - a host process to look for
    try:
        r = await SHELL.invoke(
            {"command": "ps -eo args; ls /root /home /sys /var/run 2>&1; ls -a /tmp /var/tmp /run /dev/shm"},
            ctx_for(ws, "bwrap"),
        )
    finally:
        sleeper.kill()
        sleeper.wait()
    procs = r.text.split("\nls: ")[0].splitlines()[1:]
    assert tag not in r.text and len(procs) <= 4, procs  # bwrap, bash, ps: none of the host's
    assert f"advisor-attack-{host.token}" not in r.text and "No such file" in r.text
    host.sockets_untouched()


@pytest.mark.skipif(BWRAP is not None, reason=f"no bwrap: {BWRAP}")
async def test_python_tool_runs_in_bwrap_by_default(ws, host):
    code = (
        "import os, socket\nprint(os.getuid(), open('/proc/self/status').read().count('Seccomp:\\t2'))\n"
        f"print(os.path.exists({str(host.marker)!r}), sum(p.isdigit() for p in os.listdir('/proc')) < 6)\n"
    )
    r = await PY.invoke({"code": code}, ToolContext(workspace=ws))
    assert r.text.splitlines()[:2] == ["1000 1", "False True"], r.text


def test_none_mode_warns_in_one_line(ws, capfd):
    from advisor.tools import confine

    confine._announced.discard("none")
    r = asyncio.run(SHELL.invoke({"command": "echo hi"}, ctx_for(ws, "none")))
    assert r.text.startswith("hi")
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sandbox none" in err[0] and "lacks any confinement" in err[0]


def test_root_without_bwrap_or_uid_switch_refuses(monkeypatch):
    from advisor.tools import confine

    monkeypatch.setattr(confine, "bwrap_problem", lambda: "bwrap (bubblewrap) is not installed")
    monkeypatch.setattr(confine, "limits_problem", lambda: "advisor runs as root without CAP_SETUID")
    with pytest.raises(confine.SandboxUnavailable) as e:
        confine.resolve("auto")
    msg = str(e.value)
    assert "\n" not in msg and "refusing" in msg and "sandbox: none" in msg
    assert confine.resolve("none") == "none"
    monkeypatch.setattr(confine, "limits_problem", lambda: None)
    assert confine.resolve("auto") == "limits"


@pytest.mark.skipif(not ROOT, reason="re-runs the suite as an unprivileged user: needs root to switch to one")
def test_the_suite_as_an_unprivileged_user():
    """This file and the file-tool attacks again, as a fresh unprivileged uid (setpriv), in a mount namespace
    where a folder closed to other users above this Python or the repository (/root, typically) is
    replaced by a tmpfs holding only them."""

    if not (shutil.which("setpriv") and shutil.which("unshare")):
        pytest.skip("setpriv/unshare (util-linux) missing")
    probe = subprocess.run(["unshare", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"root here cannot make a mount namespace: {probe.stderr.strip()}")
    import tempfile

    uid = 61_000 + os.getpid() % 1000
    home = Path(tempfile.mkdtemp(prefix="advisor-unprivileged-", dir="/tmp"))
    os.chown(home, uid, uid)
    repo = Path(__file__).resolve().parents[2]
    from advisor.tools.confine import closed_ancestor

    keep = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.prefix), str(repo)})
    # each kept path below a folder closed to other users: that folder becomes an open tmpfs holding it
    closed = {k: closed_ancestor(Path(k) / "x") for k in keep}
    closed = {k: c for k, c in closed.items() if c is not None}
    if any(str(c) == "/" for c in closed.values()):
        pytest.skip("the root folder is closed to other users")
    saved = [(i, k) for i, k in enumerate(keep) if k in closed]
    binds = "".join(f'mkdir -p "$T/{i}" && mount --rbind "{k}" "$T/{i}" && ' for i, k in saved)
    tmpfs = "".join(
        f'mount -t tmpfs -o mode=0755 tmpfs "{c}" && ' for c in sorted({str(c) for c in closed.values()})
    )
    rebinds = "".join(f'mkdir -p "{k}" && mount --rbind "$T/{i}" "{k}" && ' for i, k in saved)
    tests = [str(Path(__file__)), str(Path(__file__).with_name("test_file_tools.py"))]
    inner = " ".join(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(home / "t")]
        + ["-k", "'not unprivileged_user and not advisor_run'"]
        + tests
    )
    script = (
        f"T=$(mktemp -d) && {binds}{tmpfs}{rebinds}"
        f"cd {repo} && exec setpriv --reuid={uid} --regid={uid} --clear-groups --inh-caps=-all "
        f"env HOME={home} PATH={os.environ.get('PATH', '/usr/bin:/bin')} {inner}"
    )
    p = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    shutil.rmtree(home, ignore_errors=True)
    tail = (p.stdout + p.stderr)[-4000:]
    assert p.returncode == 0, tail
    assert " passed" in tail and " failed" not in tail, tail
    print(tail.splitlines()[-1])


@pytest.mark.skipif(not ROOT, reason="handing a workspace to another uid needs root")
def test_handing_the_workspace_over_never_reaches_the_host(ws, host):
    from advisor.tools.confine import hand_over, sandbox_uid

    (ws / "sub").mkdir()
    (ws / "sub" / "a.txt").write_text("x")
    (ws / "hostdir").symlink_to(host.dir)
    (ws / "marker-link").symlink_to(host.marker)
    os.link(host.marker, ws / "hardlink")  # the same file as the host's marker
    uid = sandbox_uid(ws)
    hand_over(ws, uid)
    assert os.stat(ws / "sub" / "a.txt").st_uid == uid and os.lstat(ws / "hostdir").st_uid == uid
    assert os.stat(host.marker).st_uid == 0 and os.stat(host.dir).st_uid == 0
    assert all(p.stat().st_uid == 0 for p in host.repo.iterdir())


def test_results_say_which_sandbox_ran(ws, mode):
    r = asyncio.run(SHELL.invoke({"command": "true"}, ctx_for(ws, mode)))
    assert r.data["sandbox"] == mode and json.dumps(r.data)


ESCAPE_APP = """
import glob, os, socket, subprocess, sys
for path, text in [({marker!r}, "pwned"), ({repo_app!r}, "pwned")]:
    try:
        with open(path, "a") as f:
            f.write(text)
        print("wrote", path)
    except OSError as e:
        print("refused", path, e)
for a in {socks!r} + [b"\\0advisor-attack-{token}"]:
    try:
        socket.socket(socket.AF_UNIX).connect(a)
        print("connected", a)
    except OSError as e:
        print("refused", a, e)
for f in glob.glob("/proc/[0-9]*/environ"):
    try:
        print([v for v in open(f, "rb").read().split(b"\\0") if b"API_KEY" in v])
    except OSError:
        pass
subprocess.Popen(["setsid", "sleep", "{tag}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
subprocess.run(["mount", "-o", "remount,rw,bind", "/"])
print("escape done")
"""


def test_an_agent_attacks_through_advisor_run(tmp_path, host):
    """End to end: a scripted model writes an escape with edit_file, runs it with shell and python, lists
    through a link to /, searches with a catastrophic pattern, and the task's command check runs the escape
    again. Nothing outside the workspace changes, no key reaches the run's files, nothing survives."""
    import yaml

    from advisor.testing import Reply, ScriptedServer, ScriptedToolCall
    from tests.security.conftest import open_workspace

    tag = f"994.{os.getpid() % 1000:03d}"
    socks = [str(x.address) for x in [host.private_socket, *host.path_sockets]]
    app = ESCAPE_APP.format(
        marker=str(host.marker), repo_app=str(host.repo / "app.py"), socks=socks, token=host.token, tag=tag
    )
    calls = [
        ScriptedToolCall("write_file", {"path": "app.py", "content": app}),
        ScriptedToolCall("shell", {"command": "python3 app.py; ln -s / rootlink; ln -s /etc etcdir"}),
        ScriptedToolCall("python", {"code": app}),
        ScriptedToolCall("list_files", {"pattern": "rootlink/*"}),
        ScriptedToolCall("list_files", {"pattern": "etcdir/**", "recursive": True}),
        ScriptedToolCall("search", {"pattern": "(a+)+$"}),
    ]
    script = [Reply(tool_calls=[c]) for c in calls] + [Reply(text="Answer: DONE")]
    key = "sk-attack-" + os.urandom(8).hex()
    with ScriptedServer({"flash": script}) as server:
        task = {
            "name": "attack",
            "goal": "Do the task. Answer DONE.",
            "tools": ["shell", "python", "write_file", "list_files", "search"],
            "workspace": {"from": "host/repo"},
            "executor": {"endpoint": "flash"},
            "check": {"type": "command", "run": "python3 app.py", "timeout_s": 120},
            "endpoints": {"flash": server.endpoint_config("flash").model_dump(exclude_none=True)},
        }
        path = tmp_path / "task.yaml"
        path.write_text(yaml.safe_dump(task, sort_keys=False))
        env = dict(os.environ, ADVISOR_ATTACK_API_KEY=key)
        with open_workspace() as runs:  # reachable by the limits mode's uid, where bwrap is absent
            p = subprocess.run(
                [sys.executable, "-m", "advisor.cli", "run", str(path), "--runs-dir", str(runs)],
                capture_output=True, text=True, env=env, timeout=600,
            )  # fmt: skip
            (result_file,) = runs.rglob("result.json")
            run_dir = result_file.parent
            shutil.copytree(run_dir, tmp_path / "run", symlinks=True)
    result_file = tmp_path / "run" / "result.json"
    result = json.loads(result_file.read_text())
    events = [json.loads(x) for x in (result_file.parent / "trace.jsonl").read_text().splitlines()]
    results = {e["name"]: e for e in events if e["type"] == "tool_result"}
    assert set(results) == {"write_file", "shell", "python", "list_files", "search"}, p.stdout + p.stderr
    assert "escape done" in results["shell"]["text"] and "escape done" in results["python"]["text"]
    checks = [e for e in events if e["type"] == "check"]
    assert checks and checks[0]["check_type"] == "command", checks
    assert_host_files_held(host, results["shell"]["data"]["sandbox"])
    assert "pwned" not in (host.repo / "app.py").read_text()
    assert "passwd" not in json.dumps(results["list_files"]) and "no matches" in results["search"]["text"]
    run_files = "".join(f.read_text(errors="replace") for f in result_file.parent.rglob("*") if f.is_file())
    assert key not in run_files + p.stdout + p.stderr
    assert alive(tag) == []
    assert result["outcome"] in ("passed", "failed")


async def test_a_command_check_that_cannot_be_confined_fails_instead_of_running(ws, monkeypatch):
    from advisor.tools import confine

    monkeypatch.setattr(confine, "bwrap_problem", lambda: "bwrap (bubblewrap) is not installed")
    (ws / "ran").unlink(missing_ok=True)
    r = await run_check(Check(type="command", run="touch ran"), "", ws, ws, Shell(sandbox="bwrap"))
    assert not r.passed and "not run: sandbox bwrap unavailable" in r.detail and not (ws / "ran").exists()
