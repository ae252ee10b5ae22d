"""A task's files packed on the driver and laid out again where a Ray worker runs it (no Ray needed)."""

import subprocess

from PIL import Image

from advisor.cluster import bundle
from advisor.task import Task
from advisor.workspace import fill_from_folder


def git(repo, *args):
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@e", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@e", "PATH": "/usr/bin:/bin"}
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def make_task(base, workspace: dict) -> Task:
    (base / "pics").mkdir(parents=True)
    Image.new("RGB", (8, 4), "red").save(base / "pics" / "chart.png")
    (base / "data.csv").write_text("a,b\n1,2\n")
    (base / "checks").mkdir()
    (base / "checks" / "judge.py").write_text("def check(answer):\n    return answer == '3'\n")
    task = Task.model_validate(
        {
            "name": "t",
            "goal": "Add the columns.",
            "inputs": {"images": ["pics/chart.png"], "files": ["data.csv"]},
            "executor": {"endpoint": "e"},
            "check": {"type": "python", "file": "checks/judge.py"},
            "workspace": workspace,
            "endpoints": {"e": {"provider": "openai", "model": "m", "free": True}},
        }
    )
    return task.with_base(base, str(base / "task.yaml"))


def test_folder_workspace_inputs_and_check_arrive_with_their_names(tmp_path):
    base = tmp_path / "driver"
    (base / "repo" / "pkg").mkdir(parents=True)
    (base / "repo" / "pkg" / "mod.py").write_text("X = 1\n")
    task = make_task(base, {"from": "repo"})
    task.validate_ready(check_env=False)
    archive = bundle.pack(task)
    here = bundle.unpack(bundle.shipped(task), archive, tmp_path / "worker")
    assert here.base_dir == tmp_path / "worker" and here.source == task.source
    here.validate_ready(check_env=False)  # every path it names exists where it now runs
    assert [p.name for p in here.input_paths("images")] == ["chart.png"]
    assert [p.read_bytes() for p in here.input_paths("files")] == [b"a,b\n1,2\n"]
    assert (here.base_dir / here.check.file).read_text().startswith("def check")
    kind, folder, _ = here.workspace_source()
    assert kind == "from" and (folder / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert not str(folder).startswith(str(base))
    # the original task is untouched, and tasks with the same files share one archive
    assert task.workspace.from_ == "repo" and bundle.key(task) == bundle.key(task.model_copy())


def test_git_workspace_is_cloned_at_its_revision_on_the_driver(tmp_path):
    base = tmp_path / "driver"
    repo = base / "project"
    repo.mkdir(parents=True)
    git(repo, "init", "-q")
    (repo / "f.txt").write_text("one\n")
    git(repo, "add", "f.txt")
    git(repo, "commit", "-qm", "one")
    first = git(repo, "rev-parse", "HEAD")
    (repo / "f.txt").write_text("two\n")
    git(repo, "commit", "-qam", "two")
    task = make_task(base, {"git": f"project@{first}"})
    here = bundle.unpack(bundle.shipped(task), bundle.pack(task), tmp_path / "worker")
    _, folder, _ = here.workspace_source()
    ws = tmp_path / "ws"
    fill_from_folder(folder, ws)
    assert (ws / "f.txt").read_text() == "one\n"
    assert git(ws, "rev-parse", "HEAD") == first  # .git came along: the agent can diff and log


def test_a_task_without_files_ships_nothing(tmp_path):
    task = Task.model_validate(
        {"goal": "Say hi.", "executor": {"endpoint": "e"},
         "endpoints": {"e": {"provider": "openai", "model": "m", "free": True}}}
    )
    assert not bundle.needs_files(task)
    here = bundle.unpack(bundle.shipped(task), None, tmp_path / "w")
    assert here.goal == "Say hi." and here.base_dir == tmp_path / "w"
