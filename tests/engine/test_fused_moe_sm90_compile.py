"""The fused-MoE kernels compile for the GPUs they are meant for (sm_90: H100/H200), with no GPU here.

The interpreter tests check the kernels' arithmetic but not that Triton can lower them to PTX and ptxas can
assemble them (register and shared-memory limits, ops the interpreter accepts but the compiler rejects). So
`fused_moe` is called on meta tensors at the release shapes (E=288, top-8, H=4096, I=1280) with every
kernel launch recorded instead of run; each distinct launch (kernel, argument types, constexprs, warps,
stages) is then compiled ahead of time for sm_90 with the ptxas that ships with Triton. This exercises
the real launch code (tile table lookup, heuristic, constexpr choices), not a hand-written signature.
Arguments are specialised as Triton's launcher does it (meta tensors count as 16-byte aligned, as real
allocations are), so the code built here is what a GPU run would build.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    # The kernels would be interpreter objects in this process: compile them in one without the variable.

    def test_sm90_compile_in_a_subprocess_without_the_interpreter():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve())]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        tail = (r.stdout + r.stderr)[-6000:]
        assert r.returncode == 0 and " passed" in tail and "skipped" not in tail, tail

else:
    import triton
    from advisor.engine.kernels import align_kernel, fused_moe
    from advisor.engine.kernels.configs import config_path, load_table
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    SM90 = GPUTarget("cuda", 90, 32)
    MAX_SHARED_SM90 = 227 * 1024  # opt-in shared memory per block on H100/H200
    E, TOP_K, H, INTER = 288, 8, 4096, 1280

    def _record_launches(monkeypatch) -> list[tuple[JITFunction, tuple, dict]]:
        """Replace every @triton.jit kernel the fused MoE launches with a recorder of (kernel, args, kwargs)."""
        calls: list[tuple[JITFunction, tuple, dict]] = []
        # Triton 3.9's default, stated explicitly (it warns when left unset).
        monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")

        class Recorder:
            def __init__(self, fn: JITFunction):
                self.fn = fn

            def __getitem__(self, grid):
                return lambda *args, **kwargs: calls.append((self.fn, args, kwargs))

        for module in (fused_moe, align_kernel):
            for name, value in vars(module).items():
                if isinstance(value, JITFunction):
                    monkeypatch.setattr(module, name, Recorder(value))
        return calls

    def _compile_request(fn: JITFunction, args: tuple, kwargs: dict) -> tuple[dict, dict, dict, dict]:
        """What the launcher would compile for this call: argument types, the values it specialises on
        (ints equal to 1 become constants, 16-divisible ints and 16-byte-aligned pointers get divisibility
        hints, as Triton's own launcher decides with the same native routine), constexprs, options."""
        names = [p.name for p in fn.params]
        bound = dict(zip(names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in names}
        options = {k: v for k, v in kwargs.items() if k not in names}
        signature, constexprs, attrs = {}, {}, {}
        for i, p in enumerate(fn.params):
            v = bound[p.name] if p.name in bound else p.default
            if p.is_constexpr:
                signature[p.name], constexprs[p.name] = "constexpr", v
                continue
            kind, key = native_specialize_impl(
                CUDABackend, v, False, not p.do_not_specialize, not p.do_not_specialize_on_alignment
            )
            signature[p.name] = kind
            if kind == "constexpr":
                constexprs[p.name] = key
            elif isinstance(key, str) and CUDABackend.parse_attr(key):
                attrs[(i,)] = CUDABackend.parse_attr(key)
        return signature, constexprs, attrs, options

    def _launches(monkeypatch, dtype: torch.dtype, batches: list[int], limits: list[float]):
        calls = _record_launches(monkeypatch)
        meta = dict(device="meta", dtype=dtype)
        w_gate, w_up = torch.empty(E, INTER, H, **meta), torch.empty(E, INTER, H, **meta)
        w_down = torch.empty(E, H, INTER, **meta)
        for T in batches:
            x = torch.empty(T, H, **meta)
            weights = torch.empty(T, TOP_K, device="meta", dtype=torch.float32)
            ids = torch.empty(T, TOP_K, device="meta", dtype=torch.int64)
            for limit in limits:
                fused_moe.fused_moe(x, w_gate, w_up, w_down, weights, ids, swiglu_limit=limit)
        unique = {}
        for fn, args, kwargs in calls:
            sig, const, attrs, opts = _compile_request(fn, args, kwargs)
            key = (
                fn.__name__,
                repr(sorted(sig.items())),
                repr(const),
                repr(attrs),
                repr(sorted(opts.items())),
            )
            unique[key] = (fn, sig, const, attrs, opts)
        return list(unique.values())

    def _compile_all(requests) -> list[str]:
        kernels = set()
        for fn, sig, const, attrs, opts in requests:
            compiled = triton.compile(ASTSource(fn, sig, const, attrs), target=SM90, options=opts)
            where = f"{fn.__name__} {const} {opts}"
            assert "cubin" in compiled.asm and len(compiled.asm["cubin"]) > 0, where
            assert compiled.metadata.shared <= MAX_SHARED_SM90, (
                f"{where}: {compiled.metadata.shared} B shared"
            )
            kernels.add(fn.__name__)
        return sorted(kernels)

    def test_release_shapes_compile_for_sm90_in_bf16_from_the_tile_table(monkeypatch):
        """Every batch the bf16 release table names (and one between entries), with and without the clamp."""
        batches = [1, 8, 64, 512, 4096, 200]
        table = load_table(config_path(E, INTER, H, torch.bfloat16))
        assert table is not None and {1, 8, 64} <= set(table)
        requests = _launches(monkeypatch, torch.bfloat16, batches, limits=[0.0, 7.0])
        kernels = _compile_all(requests)
        assert kernels == ["_align_kernel", "_combine_kernel", "_grouped_gemm_kernel"], kernels

    def test_heuristic_configs_compile_for_sm90_in_fp16(monkeypatch):
        """No fp16 table ships: the default heuristic's tiles must compile too (decode, a mid-size and a long
        prefill: BLOCK_M 16, 32 and 64)."""
        requests = _launches(monkeypatch, torch.float16, [1, 2048, 8192], limits=[7.0])
        assert "_grouped_gemm_kernel" in _compile_all(requests)
