"""Settings for the whole test run."""

import os

# A compile error in the engine's own C++ source fails the tests instead of falling back quietly to the
# PyTorch path (a machine without a compiler still falls back: advisor.engine.model.cpu_decode tells them apart).
os.environ.setdefault("ADVISOR_CPU_OPS_STRICT", "1")
