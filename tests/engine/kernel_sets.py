"""The compiled CPU ops' kernel switch for a test: the CPU's best kernels or the generic loops."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

KERNEL_SETS = ["best", "generic"]


@contextmanager
def kernel_set(ops, which: str, running: Callable[[], str] | None = None) -> Iterator[str]:
    """Switches every AVX2 kernel on ("best") or off ("generic") and yields the name of the set that runs
    (`running()` where a family reports its own, else the switch's answer). The CPU's best must be the AVX2
    set where the CPU has AVX2. The best set is restored afterwards."""
    mode = 0 if which == "best" else 1
    name = ops.set_qkernels(mode)
    if running is not None:
        name = running()
    if mode == 1:
        assert name == "generic"
    elif torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        assert name == "avx2"
    try:
        yield name
    finally:
        ops.set_qkernels(0)
