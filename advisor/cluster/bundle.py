"""A task's files, packed for a worker that shares no filesystem with the driver.

`pack` gathers what the task reads from beside its task file into one tar archive (bytes, put in Ray's
object store once and shared by every strategy's run of the task): its input images and files, a python
check's file, and its workspace (a `from:` folder as it is; a `git:` revision cloned on the driver, its
`.git` included). `unpack` lays the archive out in a worker's temporary folder and returns the task with
its paths pointing there: `inputs/images/<i>/<name>`, `inputs/files/<i>/<name>`, `check/<name>`,
`workspace/` (then a `from: workspace`). File names are kept, so the prompts the model sees are the same
as on a local run.
"""

from __future__ import annotations

import io
import tarfile
import tempfile
from pathlib import Path

from advisor.task import Inputs, Task, Workspace
from advisor.workspace import fill_from_git

WORKSPACE = "workspace"


def _entries(task: Task) -> list[tuple[str, Path]]:
    """(name in the archive, file or folder on the driver) for what the task reads."""
    out: list[tuple[str, Path]] = []
    for kind in ("images", "files"):
        for i, p in enumerate(task.input_paths(kind)):  # type: ignore[arg-type]
            out.append((f"inputs/{kind}/{i}/{p.name}", p))
    if task.check.type == "python" and task.check.file:
        p = task.base_dir / task.check.file
        out.append((f"check/{p.name}", p))
    return out


def needs_files(task: Task) -> bool:
    return bool(_entries(task)) or task.workspace is not None


def key(task: Task) -> tuple:
    """What the archive depends on: tasks (one per strategy) with the same key share one archive."""
    return (str(task.base_dir), tuple(str(p) for _, p in _entries(task)), task.workspace_source())


def pack(task: Task) -> bytes:
    """The archive of `task`'s files (blocking: a copy, maybe a git clone; run it in a thread)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in _entries(task):
            tar.add(path, arcname=name)
        source = task.workspace_source()
        if source is not None and source[0] == "git":
            with tempfile.TemporaryDirectory(prefix="advisor-git-") as tmp:
                fill_from_git(source[1], source[2] or "HEAD", Path(tmp) / WORKSPACE)
                tar.add(Path(tmp) / WORKSPACE, arcname=WORKSPACE)
        elif source is not None:
            tar.add(source[1], arcname=WORKSPACE)
    return buf.getvalue()


def shipped(task: Task) -> Task:
    """`task` with its file paths as `unpack` lays them out (relative to the unpacked folder)."""
    names = {str(p): name for name, p in _entries(task)}
    inputs = Inputs(
        images=[names[str(p)] for p in task.input_paths("images")],
        files=[names[str(p)] for p in task.input_paths("files")],
    )
    update: dict = {"inputs": inputs}
    if task.check.type == "python" and task.check.file:
        update["check"] = task.check.model_copy(update={"file": names[str(task.base_dir / task.check.file)]})
    if task.workspace is not None:
        update["workspace"] = Workspace.model_validate({"from": WORKSPACE})
    return task.model_copy(update=update).with_base(task.base_dir, task.source)


def unpack(task: Task, archive: bytes | None, root: Path) -> Task:
    """Lays `archive` out under `root` and returns `task` (already `shipped`) based there."""
    root.mkdir(parents=True, exist_ok=True)
    if archive:
        with tarfile.open(fileobj=io.BytesIO(archive), mode="r") as tar:
            tar.extractall(root, filter="tar")  # no absolute paths, no links out of root
    return task.model_copy().with_base(root, task.source)
