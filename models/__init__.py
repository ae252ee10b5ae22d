"""The project's own small checkpoints (step-nano, step-nano-large), installed as `advisor.models` so the
offline Quickstart runs from a wheel; `advisor.engine.model_paths` finds them by name."""
