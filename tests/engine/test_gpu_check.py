"""`python -m advisor.engine.gpu_check`: without CUDA it says so in one line; its checks run here on the CPU
at tiny shapes, the kernels under TRITON_INTERPRET=1 in fp32 and fp16 (the interpreter's bf16 tl.dot is
broken): every row passes on the real kernels and fails on a planted bug. The interpreter part re-runs
this file in a fresh pytest subprocess, as tests/engine/test_fused_moe.py does."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from advisor.engine import gpu_check as G

from tests.engine.interpreter import run_under_triton_interpreter

if os.environ.get("TRITON_INTERPRET") != "1":

    def test_gpu_check_under_the_triton_interpreter_in_a_subprocess():
        run_under_triton_interpreter(__file__)

    def test_without_cuda_it_prints_one_line_and_exits_0():
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
        r = subprocess.run(
            [sys.executable, "-m", "advisor.engine.gpu_check"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines() == [G.NO_CUDA]

    def test_an_unknown_group_is_a_usage_error(capsys):
        with pytest.raises(SystemExit) as e:
            G.main(["--only", "moe,kernels"])
        assert e.value.code == 2
        assert "--only: unknown group 'kernels'" in capsys.readouterr().err

    def test_greedy_comparison_names_the_first_difference():
        same = G.compare_greedy("x", [[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]])
        assert same.ok and same.figure == "2/2 prompts equal (5 tokens)"
        differ = G.compare_greedy("x", [[1, 2, 3], [4, 5], [6]], [[1, 2, 3], [4, 9], [7]])
        assert differ.ok is False
        assert differ.figure == "1/3 prompts equal (6 tokens); prompt 1 differs from token 1"

    def test_errors_are_relative_to_the_reference_and_nan_fails():
        want = torch.tensor([[2.0, -4.0]])
        assert G.errors(want + torch.tensor([[0.0, 0.04]]), want) == pytest.approx((0.04, 0.01), rel=1e-5)
        assert G.error_row("r", want * 1.001, want, 2e-3).ok
        assert G.error_row("r", want * 1.01, want, 2e-3).ok is False
        assert G.error_row("r", torch.full_like(want, float("nan")), want, 2e-3).ok is False
        with pytest.raises(ValueError, match=r"shape \(2, 1\) against the reference's \(1, 2\)"):
            G.errors(want.T, want)

    def test_a_check_that_raises_is_a_failed_row_and_the_rest_still_run(monkeypatch):
        def boom(*a, **kw):
            raise RuntimeError("no kernel image is available\nfor execution on the device")

        monkeypatch.setattr(G, "check_paged_attention", boom)
        monkeypatch.setattr(
            G, "check_step_nano", lambda *a: G.Row("nano", "3/3 prompts equal", "all equal", True)
        )
        seen = []
        rows = G.run_checks("cpu", G.Plan(only=("attention", "step-nano")), seen.append)
        assert [(r.check, r.ok) for r in rows] == [
            ("attention: raised", False),
            ("attention: raised", False),
            ("nano", True),
        ]
        assert rows[0].figure == "RuntimeError: no kernel image is available"
        assert seen == rows

    @pytest.mark.parametrize("fail", [False, True])
    def test_main_on_cuda_prints_the_table_writes_json_and_exits_1_on_a_failure(
        monkeypatch, capsys, tmp_path, fail
    ):
        """main's CUDA branch with the checks stubbed (no GPU here): the plan it hands over, the table,
        the JSON rows and the exit status."""
        import json

        got = {}

        def fake_run(device, plan, report):
            got.update(device=device, plan=plan)
            rows = [G.Row("fused MoE bf16", "max abs 1e-3", "rel <= 0.02", True, 2.0)]
            rows.append(G.Row("paged attention bf16", "max abs 1", "rel <= 0.02", not fail, 1.0))
            for r in rows:
                report(r)
            return rows

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
        monkeypatch.setattr(G, "run_checks", fake_run)
        out = tmp_path / "rows.json"
        argv = ["--only", "moe,attention", "--iters", "5", "--serving-model", "step-nano", "--json", str(out)]
        assert G.main(argv) == (1 if fail else 0)
        assert got["device"] == "cuda" and got["plan"].only == ("moe", "attention")
        assert got["plan"].bench_iters == 5 and got["plan"].serving_model == "step-nano"
        text = capsys.readouterr().out
        assert "NVIDIA H100 80GB HBM3" in text and "paged attention bf16" in text
        assert ("1 of 2 rows pass, 1 FAIL" if fail else "2 of 2 rows pass") in text
        saved = json.loads(out.read_text())
        assert [r["ok"] for r in saved["rows"]] == [True, not fail]
        assert saved["device"].startswith("NVIDIA H100 80GB HBM3: torch ")

    def test_the_table_shows_every_row_and_its_result():
        from rich.console import Console

        rows = [
            G.Row("fused MoE", "max abs 1e-3", "rel <= 0.02", True, 1.5),
            G.Row("paged", "max abs 1", "rel <= 0.02", False),
            G.Row("bench", "900 tok/s", "", None),
        ]
        console = Console(record=True, width=200)
        console.print(G.table(rows, "H100"))
        text = console.export_text()
        for want in ("H100", "fused MoE", "PASS", "paged", "FAIL", "900 tok/s", "figure", "1.5"):
            assert want in text

else:
    from advisor.engine.kernels.configs import GemmConfig

    # the quantized kernel's smallest tiles: the format tables' 64 x 128 tiles are slow to interpret
    TILES = (16, GemmConfig(16, 16, 1, 1, 1), GemmConfig(32, 32, 1, 1, 1))

    def tiny_plan(dtype: torch.dtype, **kw) -> G.Plan:
        return G.Plan(
            dtype=dtype,
            moe=(G.MoECase(8, 2, 32, 48, 5), G.MoECase(8, 3, 64, 48, 40, limit=0.6)),
            quant=(G.MoECase(6, 2, 96, 64, 5, limit=0.4),),
            quant_tiles=TILES,
            attention=(G.AttnCase(5, 4, 2, 16, 4, 21, 5), G.AttnCase(3, 6, 3, 20, 8, 30, 9)),
            step_nano_prompts=3,
            step_nano_tokens=6,
            bench_shape=(8, 2, 32, 48),
            bench_batches=(1, 5),
            bench_iters=1,
            bench_warmup=0,
            serving_model="step-nano",
            serving_dtype=torch.float32,
            serving=(2, 2, 4),
            **kw,
        )

    def test_every_row_passes_in_fp32():
        rows = G.run_checks("cpu", tiny_plan(torch.float32))
        assert all(r.ok is not False for r in rows), [r for r in rows if r.ok is False]
        names = [r.check for r in rows]
        assert sum(n.startswith("fused MoE fp32") for n in names) == 2
        for fmt in ("fp8", "nvfp4", "int4"):
            assert sum(n.startswith(f"fused MoE {fmt}") for n in names) == 1
        assert sum(n.startswith("paged attention") for n in names) == 2
        assert sum(n.startswith("step-nano greedy") for n in names) == 1
        assert sum(n.startswith("bench_moe") for n in names) == 2
        assert [r.ok for r in rows if r.check.startswith("bench_serving")] == [None, True]
        assert "3/3 prompts equal (18 tokens)" in next(r.figure for r in rows if "greedy" in r.check)

    def test_the_kernel_rows_pass_in_fp16():
        # one quantized format: the activations' dtype meets the codes the same way in all three
        plan = tiny_plan(torch.float16, only=("moe", "quant", "attention"), quant_formats=(("int4", 32),))
        rows = G.run_checks("cpu", plan)
        assert len(rows) == 5 and all(r.ok for r in rows), [r for r in rows if not r.ok]
        assert all("fp16" in r.check for r in rows)

    def test_planted_kernel_bugs_fail_their_rows(monkeypatch):
        """The bars catch a wrong kernel: the SwiGLU clamp dropped, a quantized output off by 0.1%, the
        sliding window ignored."""
        from advisor.engine.kernels import fused_moe, fused_moe_quant, paged_attention

        real_moe, real_quant, real_paged = (
            fused_moe.fused_moe,
            fused_moe_quant.fused_moe_quantized,
            paged_attention.paged_decode,
        )
        clamped = G.MoECase(8, 3, 64, 48, 40, limit=0.6)
        assert G.check_fused_moe("cpu", clamped, torch.float32).ok
        monkeypatch.setattr(fused_moe, "fused_moe", lambda *a, swiglu_limit, **kw: real_moe(*a, **kw))
        assert G.check_fused_moe("cpu", clamped, torch.float32).ok is False

        q = G.MoECase(6, 2, 96, 64, 5)
        monkeypatch.setattr(
            fused_moe_quant, "fused_moe_quantized", lambda *a, **kw: real_quant(*a, **kw) * 1.001
        )
        assert G.check_fused_moe_quant("cpu", "int4", 32, q, torch.float32, TILES).ok is False

        case = G.AttnCase(5, 4, 2, 16, 4, 21, 5)
        assert G.check_paged_attention("cpu", case, torch.float32).ok
        monkeypatch.setattr(
            paged_attention,
            "paged_decode",
            lambda q, k, v, t, starts, *rest: real_paged(q, k, v, t, starts * 0, *rest),
        )
        assert G.check_paged_attention("cpu", case, torch.float32).ok is False


def test_main_leaves_the_callers_grad_mode_as_it_was(monkeypatch, capsys):
    # a run in-process (as these tests do) must not turn autograd off for whatever runs after it
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(G, "_device_title", lambda: "stub")
    monkeypatch.setattr(G, "run_checks", lambda device, plan, progress: [])
    assert torch.is_grad_enabled()
    G.main([])
    assert torch.is_grad_enabled()
