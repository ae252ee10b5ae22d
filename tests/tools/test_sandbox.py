import asyncio
import time
from pathlib import Path

import numpy as np
from advisor.tools.registry import BUILTIN
from advisor.tools.sandbox import run_python
from advisor.tools.spec import ToolContext
from PIL import Image

PY = BUILTIN["python"]


def _alive(marker: str) -> int:
    """Live processes whose command line holds `marker` (PIDs inside a sandbox are not the host's)."""
    n = 0
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if marker.encode() in (p / "cmdline").read_bytes():
                    n += (p / "status").read_text().split("State:")[1].split()[0] != "Z"
            except (OSError, IndexError):
                pass
    return n


async def test_runs_in_workspace_with_image_libraries(ctx):
    Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(ctx.workspace / "in.png")
    code = (
        "import os, cv2, numpy as np\nfrom PIL import Image\n"
        "a = cv2.imread('in.png')\nprint(os.getcwd() == os.environ['HOME'], a.shape, int(a.mean()))\n"
        "Image.fromarray(255 - np.asarray(Image.open('in.png'))).save('out.png')\n"
    )
    r = await PY.invoke({"code": code}, ctx)
    assert not r.is_error, r.text
    assert r.text.strip() == "True (30, 40, 3) 200"
    assert np.asarray(Image.open(ctx.workspace / "out.png")).max() == 55


async def test_errors_and_exit_codes(ctx):
    r = await PY.invoke({"code": "print('before')\n1/0\n"}, ctx)
    assert r.is_error and "before" in r.text and "ZeroDivisionError" in r.text and "[exit code 1]" in r.text
    r = await PY.invoke({"code": "import sys; sys.exit(3)"}, ctx)
    assert r.is_error and "[exit code 3]" in r.text and r.data["exit_code"] == 3
    r = await PY.invoke({"code": "   "}, ctx)
    assert r.is_error and "code is empty" in r.text


async def test_timeout_kills_busy_loop_and_its_children(ctx):
    code = (
        "import subprocess, sys, os\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time\\nwhile True: time.sleep(0.0517)'])\n"
        "while True:\n    pass\n"
    )
    t = time.monotonic()
    r = await PY.invoke({"code": code, "timeout_s": 2.5}, ctx)
    assert time.monotonic() - t < 8
    assert r.is_error and r.data["timed_out"] and "timed out after 2.5 s" in r.text
    await asyncio.sleep(0.2)
    assert _alive("0.0517") == 0 and _alive("while True:\n    pass") == 0


async def test_background_children_do_not_outlive_the_call(ctx):
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(61.25)'])\n"
        "print(p.pid)\n"
    )
    r = await PY.invoke({"code": code}, ctx)
    assert not r.is_error, r.text
    await asyncio.sleep(0.2)
    assert _alive("time.sleep(61.25)") == 0


async def test_memory_limit_holds(tmp_path):
    ctx = ToolContext(workspace=tmp_path, extra={"python_memory_mb": 300})
    r = await PY.invoke({"code": "x = bytearray(800 * 1024 * 1024)\nprint('allocated')"}, ctx)
    assert r.is_error and "MemoryError" in r.text and "allocated" not in r.text
    r = await PY.invoke({"code": "x = bytearray(50 * 1024 * 1024)\nprint('ok', len(x))"}, ctx)
    assert not r.is_error and "ok 52428800" in r.text


async def test_secrets_are_not_in_the_environment(ctx, monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-very-secret")
    monkeypatch.setenv("MY_SERVICE_TOKEN", "tok-123")
    code = "import os\nprint(sorted(os.environ))\nprint(repr(open('/proc/self/environ','rb').read()))"
    r = await PY.invoke({"code": code}, ctx)
    assert not r.is_error
    assert (
        "sk-ant-very-secret" not in r.text and "ANTHROPIC_API_KEY" not in r.text and "tok-123" not in r.text
    )
    assert "'HOME'" in r.text and "'PATH'" in r.text


async def test_output_is_truncated_with_a_note(tmp_path):
    ctx = ToolContext(workspace=tmp_path, extra={"python_max_output": 2000})
    r = await PY.invoke({"code": "for i in range(100000): print(f'line {i}')"}, ctx)
    assert not r.is_error
    assert len(r.text) < 2200 and "output truncated" in r.text and "characters omitted" in r.text
    assert r.text.startswith("line 0\n") and r.text.rstrip().endswith("line 99999")


def test_run_python_directly(tmp_path):
    res = run_python("print(2 + 2)", tmp_path, timeout_s=10)
    assert (res.output, res.exit_code, res.timed_out, res.truncated_chars) == ("4\n", 0, False, 0)


async def test_timeout_is_capped_and_workspace_required(tmp_path):
    ctx = ToolContext(workspace=tmp_path, extra={"python_max_timeout_s": 1})
    t = time.monotonic()
    r = await PY.invoke({"code": "import time; time.sleep(30)", "timeout_s": 300}, ctx)
    assert r.is_error and "timed out after 1 s" in r.text and time.monotonic() - t < 5
    r = await PY.invoke({"code": "print(1)"}, ToolContext(workspace=tmp_path / "missing"))
    assert r.is_error and "does not exist" in r.text


async def test_traceback_shows_the_models_code_not_the_launcher(ctx):
    r = await PY.invoke({"code": "x = 1\ny = undefined_name + x\n"}, ctx)
    assert r.is_error and 'File "<python>", line 2' in r.text and "y = undefined_name + x" in r.text
    assert "NameError" in r.text and "<string>" not in r.text and "exec(" not in r.text


async def test_timeout_also_kills_a_child_that_left_the_group(ctx):
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(62.5)'], start_new_session=True)\n"
        "import time\ntime.sleep(60)\n"
    )
    r = await PY.invoke({"code": code, "timeout_s": 2}, ctx)
    assert r.is_error and r.data["timed_out"]
    await asyncio.sleep(0.2)
    assert _alive("time.sleep(62.5)") == 0


async def test_cancelling_the_call_kills_the_process(ctx):
    code = "import os\nopen('pid.txt', 'w').write(str(os.getpid()))\nimport time\ntime.sleep(63.75)\n"
    task = asyncio.create_task(PY.invoke({"code": code}, ctx))
    for _ in range(100):
        await asyncio.sleep(0.05)
        if (ctx.workspace / "pid.txt").exists():
            break
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    await asyncio.sleep(0.1)
    assert _alive("time.sleep(63.75)") == 0


async def test_running_code_does_not_block_the_event_loop(ctx):
    ticks = 0

    async def ticker():
        nonlocal ticks
        for _ in range(12):
            await asyncio.sleep(0.05)
            ticks += 1

    r, _ = await asyncio.gather(
        PY.invoke({"code": "import time; time.sleep(1.2); print('done')"}, ctx), ticker()
    )
    assert r.text.strip() == "done" and ticks == 12
    # and several runs overlap instead of queueing behind each other
    t = time.monotonic()
    rs = await asyncio.gather(*(PY.invoke({"code": "import time; time.sleep(1)"}, ctx) for _ in range(4)))
    assert not any(x.is_error for x in rs) and time.monotonic() - t < 3.5


async def test_code_sees_ledger_images_and_returns_new_ones(ctx, astronaut):
    await BUILTIN["crop"].invoke({"image": "img_0", "box": [100, 50, 300, 210]}, ctx)
    code = (
        "import cv2\nfrom PIL import Image\n"
        "a = cv2.imread('images/img_1.png')\nprint(a.shape)\n"
        "cv2.imwrite('images/edges.png', cv2.Canny(a, 50, 150))\n"
        "Image.open('images/img_0.png').resize((64, 64)).save('images/small.jpg')\n"
    )
    r = await PY.invoke({"code": code}, ctx)
    assert not r.is_error, r.text
    assert r.text.splitlines() == [
        "(160, 200, 3)",
        "[new image img_2: images/edges.png, 200x160 px]",
        "[new image img_3: images/small.jpg, 64x64 px]",
    ]
    assert [i for i, _ in r.images] == ["img_2", "img_3"] and r.data["images"] == ["img_2", "img_3"]
    assert ctx.images.info("img_2").op == "python" and ctx.images.get("img_3").size == (64, 64)
    # exported ledger images and unchanged files do not come back again
    r = await PY.invoke({"code": "import os; print(sorted(os.listdir('images')))"}, ctx)
    assert r.images == [] and "'img_3.png'" in r.text and "'edges.png'" in r.text


async def test_images_folder_taken_by_a_file(ctx):
    (ctx.workspace / "images").write_text("not a folder")
    r = await PY.invoke({"code": "print('still runs')"}, ctx)
    assert not r.is_error and r.text.startswith("still runs\n[task images not written to images/:")


async def test_syntax_errors_and_limits_inside_the_child(tmp_path):
    ctx = ToolContext(workspace=tmp_path, extra={"python_memory_mb": 512})
    r = await PY.invoke({"code": "x = (1,\nprint(x)"}, ctx)
    assert r.is_error and 'File "<python>", line 1' in r.text and "SyntaxError" in r.text
    code = "import resource as r\nprint(r.getrlimit(r.RLIMIT_AS)[0] // 2**20, r.getrlimit(r.RLIMIT_CORE))"
    r = await PY.invoke({"code": code, "timeout_s": 5}, ctx)
    assert r.text.strip() == "512 (0, 0)"
