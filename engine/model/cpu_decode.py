"""Fused C++ ops for decode steps on the CPU (fp32, a few tokens per call), source in `csrc/cpu_decode.cpp`.

At decode a Step layer is dozens of tiny tensors: the PyTorch path spends most of a step dispatching
elementwise ops (a norm is five, RoPE eight, the router seven) and GEMVs too small for the thread pool.
These ops collapse each cluster into one call:
- `rms_norm(x, residual, scale, eps)`: the residual add and the norm, one pass;
- `decode_attention(...)`: q/k norm, RoPE (from the step's tables), the cache write, attention over the
  cache and the sigmoid gate for one new token per row, split over (row, KV head) pairs; each pass of
  query heads and its outputs held in registers, the next pair's keys prefetched;
- `paged_attention(qkvg, q_scale, k_scale, cos, sin, k_cache, v_cache, tables, cu_q, start, block_size,
  window, Hq, eps, scale) -> [T, Hq*D]`: the same fused attention over a paged KV cache
  (`advisor.engine.serving.paged_attention`) for one flat step of N sequences. Sequence i owns the flat tokens
  [cu_q[i], cu_q[i+1]) (cu_q [N+1] int64), a run of consecutive positions start[i], start[i]+1, ...
  (start [N] int64): one token for a decode, several for a prefill chunk or a speculative verify of k+1
  tokens. qkvg [T, Hq*D + 2*Hkv*D + Hq] is the fused projection, cos/sin [T, rotary dims] the tokens'
  RoPE tables; every run's keys and values are normed, rotated and written first (position p of
  sequence i at storage row tables[i, p // block_size] * block_size + p % block_size of k_cache, v_cache
  [num_blocks*block_size, Hkv, D]; tables [N, width] int64, -1 where a block is freed or absent), then
  each token attends over its sequence's positions [0, p] (window <= 0) or (p - window, p], so a run is
  causal within itself and sees everything before it. A verify therefore passes its k+1 tokens as one
  run at the sequence's next positions, with blocks allocated for them; rejecting drafts needs no call:
  their rows are overwritten by the next run at those positions. Blocks shared by prefix hits are only
  read. Every block read or written is checked against the pool first (a clear error, nothing written).
  Work splits across threads per token for the writes, then per (sequence, tile of 16 tokens, KV head);
- `route(x, weight, bias, k, scale)`: the sigmoid router's top-k and renormalised weights;
- `decode_experts(...)`: the selected experts and the shared expert, each expert's K-major weights (or
  the same in 16 x 16 tiles, `advisor.engine.model.moe.block16`, one sequential stream) read once, in place, for all
  of its tokens (tasks of at most 64 rows split across ATen's threads; each token's pairs then summed in
  expert order, tokens split across threads). Where the CPU has AVX2 + FMA (`experts_kernel()` "avx2") the
  GEMMs are register tiles of 6 tokens x 16 columns held over the whole K; elsewhere (or after
  `set_qkernels(1)`) generic tiles of 4 tokens. Measured on the 2-core AVX2 CPU here (E=64, top-8, H=512,
  I=128, one thread, thread CPU time, the machine loaded), routed experts per layer, AVX2 / generic /
  `advisor.engine.model.moe.experts_torch` on the blocked weights: 0.86 / 1.2 / 4.4 ms for one token, 6.4 / 11 / 30
  for sixteen, 9.4 / 35 / 46 for 64, 29 / 133 / 74 for 256, 56 / 264 / 107 for 512 (64 pairs per expert),
  108 / 543 / 177 for 1024. So with the AVX2 kernel it runs at any size (decode and prefill chunks); with
  the generic one while there are at most 32 pairs per expert;
- `decode_moe(...)`: `route` then `decode_experts`, the MoE block in one call;
- `panel_linear(x, panels, n)`: a projection of up to a hundred-odd rows on a weight in 16-column panels
  (`advisor.engine.model.layers.to_panels`), one sequential weight stream per thread, read ahead; an AVX2 + FMA kernel
  where the CPU has them (rows six at a time against each panel, independent accumulators per row), else the
  generic loop; `set_qkernels(1)` forces the generic one (tests, `python -m advisor.engine.bench_linear`).
- `mtp_layer(...)`: one MTP layer's drafting round over block tables (`advisor.engine.serving.speculation`): the
  embedding, enorm / hnorm and eh_proj, its block (a dense MLP; attention as `paged_attention`), the head
  and its argmax at each sequence's last token, in one call instead of a dozen small ops and their glue
  (eh_proj and the head as column panels);
- `mtp_draft(...)`: a whole greedy drafting round, every MTP layer chained (layer j's drafts and stream
  feeding layer j + 1) for all speculating sequences, with `PagedDrafter.draft`'s firm ends and carried rows.
The hot loops are built three times (AVX-512, AVX2 + FMA, baseline x86-64) and the CPU's features pick one
at load time; exp is vectorised (softmax, SwiGLU).
The callers (`advisor.engine.model.attention`, `advisor.engine.model.moe`, `advisor.engine.model.layers.RMSNorm` and `Linear`) take them only where `usable`
holds; everything else runs the PyTorch path, which stays the definition of the maths.

Compiled once per machine with the C++ toolchain PyTorch uses (`torch.utils.cpp_extension`, with ninja;
one to two minutes): by `python -m advisor.engine.build` in the README's set-up, else by the first model load,
which says so on one line first. The build lives in the torch extensions directory
(`$TORCH_EXTENSIONS_DIR`, else `~/.cache/torch_extensions`) in a folder named for a digest of the source,
the torch installation, Python and the flags, built from a copy of the source kept there: the clones that
share a Python environment and the source share one build, and a changed source or another environment
builds beside it instead of over it. Where the machine has no toolchain (no
ninja, no C++ compiler, or one that cannot build an OpenMP program), or `ADVISOR_CPU_OPS=0` is set, `ops()`
returns None and the PyTorch path runs, after one log line. A toolchain that works but fails on our source
is a bug in the source, not a missing feature: the compiler's output is logged as an error, and with
`ADVISOR_CPU_OPS_STRICT=1` (set for the tests, `tests/conftest.py`) `CpuOpsBuildError` is raised instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_decode.cpp"
_lock = threading.Lock()
_state: dict[str, object] = {}


def ops():
    """The compiled module (`rms_norm`, `decode_attention`, `paged_attention`, `route`, `decode_experts`,
    `decode_moe`, `panel_linear`, `experts_kernel`, ...), or None."""
    if "ops" in _state:
        return _state["ops"]
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _build()
    return _state["ops"]


class CpuOpsBuildError(RuntimeError):
    """The toolchain works but the ops' source did not build (raised under `ADVISOR_CPU_OPS_STRICT=1`)."""


_NAME = "advisor_cpu_decode"
_CFLAGS = ("-O3", "-fopenmp")  # tuples: torch's load() appends to the lists it is given
_LDFLAGS = ("-fopenmp",)


def build_directory(source: Path = _SOURCE, name: str = _NAME) -> Path:
    """Where the ops for this source, torch and Python are (or will be) built."""
    from torch.utils.cpp_extension import get_default_build_root

    key = hashlib.sha256(source.read_bytes())
    # everything the library's bytes depend on: torch's release and build (its headers and ABI), Python's,
    # the flags. Not where torch is installed: the library names torch's libraries without a path (they are
    # loaded by `import torch`) and a built one is imported without asking ninja, so every environment with
    # the same torch shares one build (a fresh venv does not compile again)
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", None)
    key.update(f"{torch.__version__} {torch.version.cuda} {abi} {sys.version} {_CFLAGS} {_LDFLAGS}".encode())
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return root / f"{name}-{key.hexdigest()[:16]}"


def is_built(source: Path = _SOURCE, name: str = _NAME) -> bool:
    """Whether loading the ops is only an import (the library exists), not a compile."""
    return (build_directory(source, name) / f"{name}.so").is_file()


def _build(source: Path = _SOURCE, name: str = _NAME, build_directory: str | None = None):
    if os.environ.get("ADVISOR_CPU_OPS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load
    except ImportError as e:  # a torch without its extension tooling (setuptools missing)
        log.warning("engine: CPU decode ops unavailable (%s); using the PyTorch path", e)
        return None
    if build_directory is None:
        source, build_directory = _staged(source, name)
    library = Path(build_directory) / f"{name}.so"
    if library.is_file():  # built for this source, torch and Python (the folder's name says so): an import
        module = _import(name, library)
        if module is not None:
            return module
    with _venv_ninja():
        missing = _toolchain_problem(probe=False)  # before torch's own multi-line warning about the compiler
        if missing is not None:
            log.warning("engine: CPU decode ops unavailable (%s); using the PyTorch path", missing)
            return None
        try:
            log.info(
                "engine: compiling the CPU decode ops (fused C++ kernels for fast CPU decoding), once per machine: a minute or two; "
                "`python -m advisor.engine.build` does it at set-up"
            )
            return load(
                name,
                sources=[str(source)],
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=build_directory,
                verbose=False,
            )
        except Exception as e:  # torch reports a missing compiler and an error in our source alike; tell them apart
            missing = _toolchain_problem()
            if missing is not None:  # nothing to fix here: the PyTorch path is always there
                log.warning("engine: CPU decode ops unavailable (%s); using the PyTorch path", missing)
                return None
            if os.environ.get("ADVISOR_CPU_OPS_STRICT", "0") == "1":
                raise CpuOpsBuildError(f"engine: {source} does not build with a working toolchain:\n{e}") from e
            log.error("engine: %s does not build with a working toolchain (a bug in it); using the PyTorch path:\n%s",
                      source, e)
            return None


def _import(name: str, library: Path):
    """The built library imported directly, without asking ninja whether it is current: the build folder is
    keyed by everything that goes into the library, and which ninja is first on PATH (a system one and the
    venv's, of different versions, read each other's build log as stale) must not turn a load into a
    100-second rebuild. None when the file does not load (a build cut off mid-link): then it is rebuilt."""
    import importlib.util

    try:
        spec = importlib.util.spec_from_file_location(name, library)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except (ImportError, OSError) as e:
        log.warning("engine: the built CPU decode ops in %s do not load (%s); building them again", library, e)
        return None
    return module


@contextlib.contextmanager
def _venv_ninja():
    """PATH with this environment's own ninja (the `ninja` package's) first while a build runs, so the build
    uses the same ninja whichever shell started Python, and a venv's ninja counts even when its bin folder is
    not on PATH (a `.venv/bin/python` run without activating)."""
    try:
        import ninja

        bin_dir = ninja.BIN_DIR
    except (ImportError, AttributeError):
        yield
        return
    old = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([bin_dir, old]) if old else bin_dir
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _staged(source: Path, name: str) -> tuple[Path, str]:
    """The source copied into its build directory (so the build's paths, which ninja compares, are the
    same from every clone), and that directory."""
    d = build_directory(source, name)
    d.mkdir(parents=True, exist_ok=True)
    staged = d / source.name
    if not staged.is_file():  # written once: a rewrite would change its mtime and rebuild
        tmp = d / f".{source.name}.{os.getpid()}"
        shutil.copyfile(source, tmp)
        os.replace(tmp, staged)
    return staged, str(d)


def _toolchain_problem(probe: bool = True) -> str | None:
    """Why this machine cannot build C++ extensions at all, or None when it can: ninja and the compiler
    torch would use (`CXX`, else c++) there, and with `probe` that compiler building and linking a trivial
    OpenMP program (a subprocess: run only once a build has failed)."""
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja not found"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx} not found"
    if not probe:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            subprocess.run(
                [cxx, "-x", "c++", "-fopenmp", "-", "-o", str(Path(tmp) / "probe")],
                input=b"int main() { return 0; }\n",
                capture_output=True,
                timeout=120,
                check=True,
            )
        except (OSError, subprocess.SubprocessError) as e:
            return f"{cxx} cannot build an OpenMP program ({type(e).__name__})"
    return None


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these tensors can go through the compiled ops: fp32 on the CPU, no autograd."""
    for t in tensors:
        if not t.is_cpu or t.dtype is not torch.float32:
            return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


def experts_fit(n_pairs: int, gate_up_t: torch.Tensor, down_t: torch.Tensor) -> bool:
    """Whether the routed experts of a call go through `decode_experts`: K-major or blocked weights laid out
    contiguously, and any number of (token, expert) pairs with the AVX2 kernel (`experts_kernel()`), at most 32
    per expert with the generic loops (beyond that MKL's GEMMs catch up)."""
    if not (gate_up_t.is_contiguous() and down_t.is_contiguous()):
        return False
    m = ops()
    return n_pairs <= 32 * gate_up_t.shape[0] or (m is not None and m.experts_kernel() == "avx2")
