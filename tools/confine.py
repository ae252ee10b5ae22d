"""Where model-written code runs: one confinement for the shell and python tools and command checks.

Modes (a task's `shell: {sandbox: ...}`):

- `bwrap` (bubblewrap): a user namespace with an unprivileged uid/gid and no capabilities (even when
  advisor is root), every namespace unshared (its own PID namespace and /proc, no network unless the
  task allows it, own IPC and UTS), a new session, no further user namespaces, and a seccomp filter
  (built with libseccomp) that refuses mount, ptrace, keyctl, bpf, namespace creation and the like.
  The tree holds only the system's programs and libraries read-only (files in /etc that other users
  may not read are masked), fresh tmpfs on /tmp, /var/tmp, /run and /dev/shm, and the workspace as
  the only writable bind: no home folder, no host /proc or /sys, no host socket.
- `limits`: where bwrap is absent. When advisor is root, the code runs as an unprivileged uid of its
  own (the workspace is handed to it), so the parent's /proc/*/environ is unreadable and it cannot
  leave its cgroup; no_new_privs and the same seccomp filter apply. No file-system or network
  confinement: it sees what any local user sees.
- `none`: no confinement beyond the limits below (a task must ask for it; a warning is printed).
- `auto` (the default): bwrap where it runs, else limits; as root with neither, code tools refuse.

Every mode: a clean environment (no API keys), rlimits, a cgroup per call where cgroups are writable
(`pids.max`, `memory.limit_in_bytes`), and a launcher that is a child subreaper, so that orphaned
and double-forked descendants stay its children: when the code's main process ends, or the call is
killed, every descendant is killed. Under bwrap, killing the call kills its PID namespace.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import os
import secrets
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Mode = Literal["auto", "bwrap", "limits", "none"]
MODES = ("auto", "bwrap", "limits", "none")
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PARENT = "advisor"
SANDBOX_UID_BASE = 200_000  # limits mode as root: each workspace gets a uid of its own above this
SANDBOX_UID_SPAN = 100_000
INNER_UID = 1000  # the uid and gid model code has inside the bwrap user namespace
# Only these variables reach model code; everything else (API keys, tokens, proxies) stays behind.
ENV_ALLOW = ("PATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT")

# Refused with EPERM inside every sandbox (bwrap: through --seccomp; limits: loaded by the launcher).
DENIED_SYSCALLS = (
    "mount", "umount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr",
    "unshare", "setns",
    "ptrace", "process_vm_readv", "process_vm_writev", "kcmp", "pidfd_getfd",
    "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "open_by_handle_at", "name_to_handle_at", "reboot", "swapon", "swapoff", "syslog", "acct",
    "quotactl", "lookup_dcookie", "vhangup", "settimeofday", "clock_settime", "clock_adjtime",
    "adjtimex", "iopl", "ioperm", "personality",
)  # fmt: skip
# clone() flags that make a namespace (mount, cgroup, UTS, IPC, user, PID, network, time)
_CLONE_NEW = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80)
_TIOCSTI = 0x5412  # push characters into a terminal's input: refused


class SandboxUnavailable(Exception):
    """The configured sandbox cannot run here; the message says why and what to use instead."""


# -- what the machine allows ----------------------------------------------------------------------


@functools.cache
def bwrap_problem() -> str | None:
    """None when bubblewrap can build our sandbox here, else one line saying why not (cached)."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bwrap (bubblewrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    try:
        p = subprocess.run(
            [exe, "--unshare-user", "--uid", str(INNER_UID), "--gid", str(INNER_UID)]
            + ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all"]
            + ["--cap-drop", "ALL", "--disable-userns", "--die-with-parent", "true"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap cannot start: {e}"
    if p.returncode != 0:
        why = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return f"bwrap cannot create its namespaces here ({why}; no unprivileged user namespaces?)"
    try:
        seccomp_bpf()
    except Exception as e:  # no pyseccomp or no libseccomp.so.2: bwrap without the filter is not offered
        return (
            f"the seccomp filter cannot be built ({type(e).__name__}: {e}; needs libseccomp2 and pyseccomp)"
        )
    return None


def reachable_by_others(path: str) -> bool:
    """Whether a user with no relation to the owners may reach and run `path` (every folder o+x)."""
    real = Path(os.path.realpath(path))
    try:
        if not real.stat().st_mode & 0o001:
            return False
        return all(p.stat().st_mode & 0o001 for p in real.parents)
    except OSError:
        return False


def is_root() -> bool:
    return os.geteuid() == 0


def _has_cap(bit: int) -> bool:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> bit & 1)
    except OSError:
        pass
    return False


@functools.cache
def limits_problem() -> str | None:
    """As root, limits mode needs to switch to an unprivileged uid (CAP_SETUID, CAP_SETGID, CAP_CHOWN)."""
    if not is_root():
        return None
    missing = [
        name for name, bit in (("CAP_CHOWN", 0), ("CAP_SETGID", 6), ("CAP_SETUID", 7)) if not _has_cap(bit)
    ]
    if missing:
        return f"advisor runs as root without {', '.join(missing)}, so model code cannot be moved to an unprivileged uid"
    return None


def resolve(mode: str) -> str:
    """The mode a call runs in (`auto` picked), or SandboxUnavailable with a one-line reason."""
    if mode not in MODES:
        raise SandboxUnavailable(f"unknown sandbox {mode!r}; use one of {', '.join(MODES)}")
    if mode == "none":
        return "none"
    if mode == "bwrap":
        problem = bwrap_problem()
        if problem:
            raise SandboxUnavailable(
                f"sandbox bwrap unavailable: {problem}; install it, or set `shell: {{sandbox: limits}}` "
                "(an unprivileged uid and process limits, no file-system confinement)"
            )
        return "bwrap"
    if mode == "auto" and bwrap_problem() is None:
        return "bwrap"
    problem = limits_problem()
    if problem:
        why = f", and bwrap is unavailable ({bwrap_problem()})" if mode == "auto" else ""
        raise SandboxUnavailable(
            f"refusing to run model code: {problem}{why}; use bubblewrap (`shell: {{sandbox: bwrap}}`), "
            "or set `shell: {sandbox: none}` to run it unconfined"
        )
    if not is_root():
        hide_environ()
    return "limits"


def hide_environ() -> None:
    """Make this process non-dumpable, so that code running as the same user cannot read its
    /proc/<pid>/environ (the API keys) or ptrace it: the kernel gives such a process's /proc files to root.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    except (OSError, AttributeError):
        pass


def lacks(mode: str) -> list[str]:
    """What a resolved mode does not protect against here."""
    if mode == "bwrap":
        return [] if cgroups_writable() else ["a memory cap on the whole process tree (no writable cgroup)"]
    if mode == "none":
        return ["any confinement: model code runs as advisor's user with its files, network and processes"]
    out = [
        "file-system confinement (it reads what any local user may)",
        "network isolation",
        "a PID namespace",
    ]
    if not is_root():
        out.append("a uid of its own (it runs as advisor's user and could signal advisor)")
    if not cgroups_writable():
        out.append("cgroups (processes limited by RLIMIT_NPROC, memory per process)")
    return out


_announced: set[str] = set()


def notice(mode: str) -> str | None:
    """The one line printed when a mode with gaps is first used (None for a complete one)."""
    gaps = lacks(mode)
    if not gaps:
        return None
    return f"advisor: code tools run with sandbox {mode}, which lacks " + "; ".join(gaps)


def announce(mode: str) -> None:
    """Print `notice(mode)` to stderr once per process and mode."""
    line = notice(mode)
    if line and mode not in _announced:
        _announced.add(mode)
        print(line, file=sys.stderr, flush=True)


# -- seccomp ------------------------------------------------------------------------------------


@functools.cache
def seccomp_bpf() -> bytes:
    """The deny-list filter as classic BPF, compiled by libseccomp (the pyseccomp bindings)."""
    import pyseccomp as sc

    f = sc.SyscallFilter(sc.ALLOW)
    eperm = sc.ERRNO(1)
    for name in DENIED_SYSCALLS:
        try:
            f.add_rule(eperm, name)
        except (ValueError, RuntimeError, OSError):
            continue  # not a syscall on this architecture
    for bit in _CLONE_NEW:  # one rule per flag: a clone with any of them is refused
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, bit, bit))
    # clone3 passes its flags in memory seccomp cannot read: ENOSYS makes libc fall back to clone
    f.add_rule(sc.ERRNO(38), "clone3")
    f.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, _TIOCSTI))
    with tempfile.TemporaryFile() as t:
        f.export_bpf(t)
        t.seek(0)
        return t.read()


_seccomp_dir: list[Path] = []


def seccomp_path() -> Path:
    """The filter as a file in a folder only advisor's uid may enter (written once per process): model
    code, in the call's scratch folder or another call's, cannot change what the next launcher loads."""
    path = _seccomp_dir[0] / "seccomp.bpf" if _seccomp_dir else None
    if path is None or not path.is_file():
        folder = Path(tempfile.mkdtemp(prefix="advisor-seccomp-"))
        atexit.register(shutil.rmtree, folder, True)
        tmp = folder / "seccomp.bpf.tmp"
        tmp.write_bytes(seccomp_bpf())
        os.replace(tmp, folder / "seccomp.bpf")
        _seccomp_dir[:] = [folder]
        path = folder / "seccomp.bpf"
    return path


# -- cgroups --------------------------------------------------------------------------------------


@functools.cache
def cgroups_writable() -> bool:
    probe = Cgroup.create(256, 64)
    if probe is None:
        return False
    probe.remove()
    return True


class Cgroup:
    """One call's cgroups (v1 pids and memory), when this process may create them."""

    def __init__(self, dirs: list[Path]):
        self.dirs = dirs

    @classmethod
    def create(cls, max_processes: int, memory_mb: int) -> Cgroup | None:
        if os.environ.get("ADVISOR_NO_CGROUPS"):
            return None
        name = f"cmd-{os.getpid()}-{secrets.token_hex(4)}"
        settings = {
            "pids": {"pids.max": str(max_processes)},
            "memory": {"memory.limit_in_bytes": str(memory_mb * 1024 * 1024)},
        }
        made: list[Path] = []
        for controller, files in settings.items():
            base = CGROUP_ROOT / controller
            if not (base / "cgroup.procs").exists():
                continue
            d = base / CGROUP_PARENT / name
            try:
                d.mkdir(parents=True)
                for fname, value in files.items():
                    (d / fname).write_text(value)
                if controller == "memory" and (d / "memory.memsw.limit_in_bytes").exists():
                    try:  # no swapping around the cap
                        (d / "memory.memsw.limit_in_bytes").write_text(files["memory.limit_in_bytes"])
                    except OSError:
                        pass
            except OSError:
                _rmdir(d)
                continue
            made.append(d)
        return cls(made) if made else None

    @property
    def controllers(self) -> list[str]:
        return [d.parent.parent.name for d in self.dirs]

    def procs_files(self) -> dict[str, str]:
        return {d.parent.parent.name: str(d / "cgroup.procs") for d in self.dirs}

    def pids(self) -> list[int]:
        out: set[int] = set()
        for d in self.dirs:
            try:
                out.update(int(x) for x in (d / "cgroup.procs").read_text().split())
            except OSError:
                pass
        return sorted(out)

    def kill(self, rounds: int = 50) -> None:
        # a fork loop keeps adding members while we kill; pids.max bounds it, a few rounds empty it
        for _ in range(rounds):
            members = self.pids()
            if not members:
                return
            for pid in members:
                _kill(pid)
            time.sleep(0.01)

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        left = list(self.dirs)
        while left and time.monotonic() < deadline:  # members leave when they are reaped
            self.kill(rounds=1)
            left = [d for d in left if not _rmdir(d)]
            if left:
                time.sleep(0.02)


def _rmdir(d: Path) -> bool:
    try:
        d.rmdir()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# -- killing ----------------------------------------------------------------------------------------


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def descendants(pid: int) -> list[int]:
    """All live descendants of pid, from /proc (Linux); catches children that left the process group."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(text.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_tree(pid: int, rounds: int = 20) -> None:
    """Kill every descendant of the launcher, then the launcher.

    The launcher is a child subreaper, so a descendant orphaned while we kill becomes its child and
    is found in the next round; the launcher itself goes last.
    """
    for _ in range(rounds):
        found = descendants(pid)
        if not found:
            break
        for child in found:
            _kill(child)
        time.sleep(0.005)
    _kill(pid)
    kill_group(pid)


def kill_all(pid: int, cgroup: Cgroup | None, exited_bwrap: bool = False) -> None:
    """Kill everything a call started. `exited_bwrap`: the launcher was bwrap and has exited, so its
    PID namespace (every process of the call) is gone already and the /proc sweep is skipped."""
    if cgroup is not None:
        cgroup.kill()
    if exited_bwrap:
        kill_group(pid)
        return
    kill_tree(pid)


# -- the tree bwrap builds --------------------------------------------------------------------------


@functools.cache
def _masked_etc() -> tuple[tuple[str, bool], ...]:
    """Paths under /etc that other users may not read: (path, is_dir), masked inside the sandbox."""
    out: list[tuple[str, bool]] = []
    for dirpath, dirnames, filenames in os.walk("/etc"):
        closed = set()
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            try:
                mode = os.lstat(p).st_mode
            except OSError:
                continue
            if stat.S_ISDIR(mode) and mode & 0o005 != 0o005:
                out.append((p, True))
                closed.add(name)  # masked whole: not walked
            elif stat.S_ISREG(mode) and not mode & 0o004:
                out.append((p, False))
        dirnames[:] = [d for d in dirnames if d not in closed]
    return tuple(out)


_FRESH = ("/tmp", "/var/tmp", "/run")  # fresh tmpfs in the sandbox: nothing of the host's shows through


def _interpreter_dirs() -> list[str]:
    dirs = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable))]
    return [d for d in dirs if d]


def _visible_dirs() -> list[str]:
    """Program folders bound read-only: this interpreter and its venv, and the PATH's folders (none under
    the fresh tmpfs folders: `_fresh_interpreter_dirs` has the interpreter's own there)."""
    dirs = _interpreter_dirs() + os.environ.get("PATH", "").split(os.pathsep)
    return _outermost(dirs, lambda real: not real.startswith(_FRESH))


def _fresh_interpreter_dirs() -> list[str]:
    """This interpreter's folders that lie under /tmp, /var/tmp or /run (a venv made in a temporary folder,
    as CI and throwaway set-ups do): bound read-only over the fresh tmpfs, after it, so the sandbox can run
    the interpreter without seeing the rest of the host's temporary files."""
    return _outermost(_interpreter_dirs(), lambda real: real.startswith(_FRESH))


def _outermost(dirs: list[str], keep) -> list[str]:
    out: list[str] = []
    home = os.path.realpath(os.path.expanduser("~"))
    for d in dirs:
        if not d or not os.path.isabs(d) or not os.path.isdir(d):
            continue
        real = os.path.realpath(d)
        if real in ("/", home, *_FRESH) or real.startswith(("/proc", "/sys", "/dev")) or not keep(real):
            continue
        if any(real == o or real.startswith(o + "/") for o in out):
            continue
        out = [o for o in out if not o.startswith(real + "/")] + [real]
    return sorted(out)


def bwrap_argv(workspace: Path, scratch: Path, network: bool, seccomp_fd: int) -> list[str]:
    """bwrap's arguments up to the command: the minimal tree and every namespace (see the module doc)."""
    argv = [shutil.which("bwrap") or "bwrap", "--unshare-all", "--unshare-user"]
    argv += ["--uid", str(INNER_UID), "--gid", str(INNER_UID), "--hostname", "sandbox"]
    argv += ["--share-net"] if network else []
    argv += ["--cap-drop", "ALL", "--disable-userns", "--new-session", "--die-with-parent"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/usr"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind", "/etc", "/etc"]
    for path, is_dir in _masked_etc():
        argv += ["--tmpfs", path] if is_dir else ["--ro-bind", "/dev/null", path]
    if network:  # the resolver's files may be links into /run, which is a fresh tmpfs here
        for f in ("/etc/resolv.conf", "/etc/hosts"):
            real = os.path.realpath(f)
            if real != f and real.startswith("/run/") and os.path.isfile(real):
                argv += ["--ro-bind", real, real]
    for d in _visible_dirs():
        if not d.startswith(("/usr/", "/etc/")) and d != "/usr":
            argv += ["--ro-bind", d, d]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    for t in ("/tmp", "/var/tmp", "/run", "/dev/shm"):
        argv += ["--tmpfs", t]
    for d in _fresh_interpreter_dirs():  # over the tmpfs, so after it
        argv += ["--ro-bind", d, d]
    argv += ["--bind", str(scratch), str(scratch)]
    argv += ["--bind", str(workspace), str(workspace), "--chdir", str(workspace)]
    argv += ["--seccomp", str(seccomp_fd)]
    return argv


# -- limits mode as root: a uid of the workspace's own ------------------------------------------------


def sandbox_uid(workspace: Path) -> int:
    """The unprivileged uid (and gid) that runs a workspace's code when advisor is root."""
    return SANDBOX_UID_BASE + zlib.crc32(str(workspace).encode()) % SANDBOX_UID_SPAN


def closed_ancestor(path: Path) -> Path | None:
    """The first folder above `path` that other users may not enter (search), or None."""
    for p in reversed(Path(path).parents):
        try:
            if not os.stat(p).st_mode & 0o001:
                return p
        except OSError:
            return p
    return None


def hand_over(root: Path, uid: int) -> None:
    """Make the workspace the sandbox uid's, never following a link out of it.

    Walked by directory descriptors (os.fwalk) and changed relative to them, so a folder swapped for
    a link by code still running cannot redirect a root chown to the host. A regular file with more
    than one link is skipped: it may be a hard link to a host file.
    """

    def give(name: str, st: os.stat_result, dir_fd: int | None) -> None:
        if (st.st_uid, st.st_gid) != (uid, uid) and not (stat.S_ISREG(st.st_mode) and st.st_nlink > 1):
            try:
                os.chown(name, uid, uid, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                pass

    give(str(root), os.lstat(root), None)
    for _, dirnames, filenames, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in dirnames + filenames:
            try:
                give(name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False), dir_fd)
            except OSError:
                continue


# -- launching --------------------------------------------------------------------------------------

# Runs in the child before model code, as advisor's user: joins the cgroups, sets the rlimits, becomes
# a child subreaper and forks; the fork drops to the sandbox uid (limits mode as root), sets
# no_new_privs, loads the seccomp filter (limits mode; bwrap loads its own) and execs the command.
# The launcher waits for it, then kills every descendant left (all of them are its children by then),
# and exits as the command did. Not preexec_fn, which is unsafe in threaded parents.
_LAUNCHER = r"""
import ctypes, json, os, resource, signal, sys
cfg = json.loads(sys.argv[1])
argv = sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
for procs in cfg["cgroups"]:
    try:
        with open(procs, "w") as f:
            f.write(str(os.getpid()))
    except OSError:
        cfg["rlimits"].update(cfg["fallback"].get(procs, {}))
for name, value in cfg["rlimits"].items():
    kind = getattr(resource, name)
    soft, hard = value if isinstance(value, list) else (value, value)
    cap = resource.getrlimit(kind)[1]
    if cap != resource.RLIM_INFINITY:
        soft, hard = min(soft, cap), min(hard, cap)
    try:
        resource.setrlimit(kind, (soft, hard))
    except (ValueError, OSError):
        pass
libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, signal.SIG_IGN)
bpf = None
if cfg["seccomp"]:
    with open(cfg["seccomp"], "rb") as f:
        bpf = f.read()
pid = os.fork()
if pid == 0:
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        if cfg["seccomp_fd"]:
            fd = os.open(cfg["seccomp_fd"], os.O_RDONLY)
            if fd != 3:
                os.dup2(fd, 3)
                os.close(fd)
            os.set_inheritable(3, True)
        if cfg["uid"] is not None:
            os.setgroups([])
            os.setgid(cfg["uid"])
            os.setuid(cfg["uid"])
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: setuid programs cannot raise it
            raise OSError(ctypes.get_errno(), "no_new_privs")
        if bpf is not None:
            class Prog(ctypes.Structure):
                _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_char_p)]
            prog = Prog(len(bpf) // 8, bpf)
            if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
                raise OSError(ctypes.get_errno(), "seccomp filter not loaded")
        os.execvp(argv[0], argv)
    except BaseException as e:
        os.write(2, f"advisor sandbox: cannot start {argv[0]}: {e}\n".encode())
        os._exit(127)
status = None
while True:
    try:
        got, st = os.waitpid(-1, 0)
    except ChildProcessError:
        break
    except InterruptedError:
        continue
    if got == pid:
        status = st
        break
def sweep():
    me = os.getpid()
    for _ in range(100):
        kids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        if int(f.read().rsplit(")", 1)[1].split()[1]) == me:
                            kids.append(int(entry))
                except (OSError, ValueError, IndexError):
                    pass
        if not kids:
            return
        for k in kids:
            try:
                os.kill(k, signal.SIGKILL)
            except OSError:
                pass
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
# what the command left behind: its orphans and their children (ours now, as the subreaper) die with it
sweep()
if status is None:
    os._exit(1)
if os.WIFSIGNALED(status):
    sig = os.WTERMSIG(status)
    if sig != signal.SIGKILL:
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
    os.kill(os.getpid(), sig)
os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 1)
"""


@dataclass
class Box:
    """One call's launch: what to exec and with what, and what to clean up after it."""

    mode: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    scratch: Path  # the call's temp folder (TMPDIR), removed by close()
    cgroup: Cgroup | None
    uid: int | None = None
    # the launcher is bwrap itself (through sh and prlimit): once it has exited, its PID namespace
    # and so every process of the call are gone
    pid_namespace: bool = False

    def close(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self.scratch, ignore_errors=True)


def child_env(workspace: Path, tmp: Path) -> dict[str, str]:
    env = {k: os.environ[k] for k in ENV_ALLOW if k in os.environ}
    env["PATH"] = os.pathsep.join(
        [os.path.dirname(sys.executable)] + (env.get("PATH") or "/usr/bin:/bin").split(os.pathsep)
    )
    env.update(
        HOME=str(workspace),
        TMPDIR=str(tmp),
        USER="sandbox",
        PYTHONIOENCODING="utf-8",
        PYTHONDONTWRITEBYTECODE="1",
        PYTHONUNBUFFERED="1",
        MPLBACKEND="Agg",
        MPLCONFIGDIR=str(tmp / "mpl"),
        # One thread each: BLAS pools reserve address space per thread and would trip the memory cap.
        OMP_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
    )
    env.setdefault("LANG", "C.UTF-8")
    return env


def prepare(
    inner: list[str],
    workspace: Path,
    mode: str,
    *,
    memory_mb: int,
    max_processes: int,
    max_file_mb: int,
    cpu_s: int | None = None,
    network: bool = False,
    scratch: Path | None = None,
    address_space_cap: bool = False,
) -> Box:
    """Build the launch of `inner` (argv) in `workspace` under a resolved `mode` (blocking: call in a thread).

    `scratch` is a temp folder the caller already made (the python tool puts its script there);
    else one is made. Either way close() removes it. `address_space_cap` sets RLIMIT_AS to the
    memory cap even under a memory cgroup (Python then raises MemoryError instead of being killed).
    """
    workspace = Path(workspace).resolve()
    scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="advisor-sh-"))
    cgroup = Cgroup.create(max_processes, memory_mb)
    procs = cgroup.procs_files() if cgroup else {}
    rlimits: dict[str, object] = {"RLIMIT_FSIZE": max_file_mb * 1024 * 1024, "RLIMIT_CORE": 0}
    if cpu_s is not None:
        rlimits["RLIMIT_CPU"] = [cpu_s, cpu_s + 1]
    mem_rl = {"RLIMIT_AS": memory_mb * 1024 * 1024} if memory_mb > 0 else {}
    uid = sandbox_uid(workspace) if mode == "limits" and is_root() else None
    # RLIMIT_NPROC counts all of the user's processes: allow what is running already plus the cap
    nproc = max_processes + (0 if uid is not None else _user_processes())
    nproc_rl = {"RLIMIT_NPROC": nproc}
    fallback: dict[str, dict] = {}
    if "memory" in procs and not address_space_cap:
        fallback[procs["memory"]] = mem_rl
    else:
        rlimits.update(mem_rl)
    if "pids" in procs:
        fallback[procs["pids"]] = nproc_rl
    else:
        rlimits.update(nproc_rl)
    env = child_env(workspace, scratch)
    seccomp_file = seccomp_path() if mode in ("bwrap", "limits") else None
    seccomp_fd = None
    if mode == "bwrap":  # bwrap reads the filter from a file descriptor: the launcher opens it as fd 3
        inner = bwrap_argv(workspace, scratch, network, 3) + inner
        seccomp_fd, seccomp_file = seccomp_file, None
    if uid is not None:
        closed = closed_ancestor(workspace)
        if closed is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            if cgroup is not None:
                cgroup.remove()
            raise SandboxUnavailable(
                f"sandbox limits runs code as an unprivileged uid, which cannot reach the workspace "
                f"{workspace}: {closed} is closed to other users; keep runs where any user may enter "
                "(e.g. --runs-dir /var/tmp/advisor-runs), or install bubblewrap"
            )
        os.chmod(scratch, 0o700)
        hand_over(scratch, uid)
        hand_over(workspace, uid)
    prlimit = shutil.which("prlimit")
    if mode == "bwrap" and prlimit:
        # bwrap's PID namespace already ends every process when the command does: a shell launcher
        # (a few ms) replaces the Python supervisor (tens of ms)
        argv = _sh_launcher(prlimit, procs, rlimits, fallback, seccomp_fd, inner)
        return Box(mode, argv, env, workspace, scratch, cgroup, uid, pid_namespace=True)
    cfg = {"cgroups": list(procs.values()), "rlimits": rlimits, "fallback": fallback, "uid": uid}
    cfg["seccomp"] = str(seccomp_file) if seccomp_file else None
    cfg["seccomp_fd"] = str(seccomp_fd) if seccomp_fd else None
    # -I -S: no site-packages to scan, the launcher needs only the standard library
    argv = [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg), *inner]
    return Box(mode, argv, env, workspace, scratch, cgroup, uid)


_PRLIMIT = {"RLIMIT_AS": "as", "RLIMIT_NPROC": "nproc", "RLIMIT_FSIZE": "fsize", "RLIMIT_CORE": "core"}
_PRLIMIT["RLIMIT_CPU"] = "cpu"


def _prlimit_args(limits: dict[str, object]) -> list[str]:
    out = []
    for name, value in limits.items():
        soft, hard = value if isinstance(value, list) else (value, value)
        out.append(f"--{_PRLIMIT[name]}={soft}:{hard}")
    return out


def _sh_launcher(
    prlimit: str, procs: dict[str, str], rlimits: dict, fallback: dict, seccomp: Path | None, inner: list[str]
) -> list[str]:
    """`sh -c`: join the cgroups (else their rlimit stands in), open the filter as fd 3, exec prlimit -> inner."""
    lines = ["fb="]
    for procs_file in procs.values():
        alt = " ".join(_prlimit_args(fallback.get(procs_file, {})))
        lines.append(f'{{ echo $$ > {shlex.quote(procs_file)}; }} 2>/dev/null || fb="$fb {alt}"')
    if seccomp is not None:
        lines.append(f"exec 3< {shlex.quote(str(seccomp))}")
    fixed = " ".join(shlex.quote(a) for a in _prlimit_args(rlimits))
    lines.append(f'exec {shlex.quote(prlimit)} {fixed} $fb -- "$@"')
    return ["/bin/sh", "-c", "\n".join(lines), "sh", *inner]


def _user_processes() -> int:
    uid = os.getuid()
    n = 0
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                n += entry.stat().st_uid == uid
            except OSError:
                pass
    return n
