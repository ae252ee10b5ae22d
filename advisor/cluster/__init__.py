"""Running tasks on a Ray cluster (`Advisor(backend="ray")`, `advisor run/eval --ray [ADDRESS]`).

Each task attempt is one Ray task (`worker.run_attempt`, a streaming generator) that runs the same
`TaskLoop` as a local run inside a worker process and yields its trace events as they happen; the driver
(`backend.RayBackend`) writes them under the run's folder exactly as a local run does. The task's files
(inputs, a python check, the workspace) travel through the object store (`bundle`). One small actor
(`limiter.Limiter`) holds the run's endpoint concurrency limits and budget for the whole cluster. See
docs/scale.md.

Ray is an optional dependency (`pip install 'advisor[ray]'`): nothing here imports it until a cluster is
used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from advisor.cluster.connect import ClusterError, connect

if TYPE_CHECKING:
    from advisor.cluster.backend import RayBackend

__all__ = ["ClusterError", "RayBackend", "connect"]


def __getattr__(name: str):
    if name == "RayBackend":  # imports ray
        from advisor.cluster.backend import RayBackend

        return RayBackend
    raise AttributeError(name)
