"""Quantized checkpoints: the formats (`formats`), which one a checkpoint declares (`scheme`), the engine's
in-memory layout of quantized weights (`packed`). The quantizer is `advisor.engine.quantize`, the fit planner
`advisor.engine.plan`."""
