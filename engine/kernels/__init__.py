"""Triton kernels for the engine (CUDA; on the CPU only under TRITON_INTERPRET=1, for tests).

- `align.moe_align_block_size`: (token, slot) pairs sorted by expert, padded per expert to BLOCK_M.
- `fused_moe.fused_moe`: routed experts (gate/up grouped GEMM with the clamped SwiGLU fused in, down grouped
  GEMM with the routing weight multiplied in, combine over the top-k slots).
- `reference.fused_moe_torch`: the same call in plain PyTorch (the kernel's semantic twin; a CPU path).
- `configs.get_config`: tile sizes from the JSON tables in `configs/`, or a heuristic.
- `bench_moe`: `python -m advisor.engine.kernels.bench_moe`, Triton vs PyTorch at the release shapes on a GPU.

Nothing here imports triton at package import: `advisor.engine.model.moe` probes `advisor.engine.kernels.fused_moe` lazily.
"""
