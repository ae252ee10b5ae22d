"""`Loops`: what the tasks run in one process share (endpoints, MCP servers, the run's limits), and the
`TaskLoop` each task runs on them. `Advisor` holds one for a local run; a Ray worker holds one per process
(advisor.cluster.worker), so both run tasks the same way."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from advisor.consult import Slot
from advisor.endpoints import Endpoint, EndpointConfig, EndpointError, make_endpoint
from advisor.limits import CallGate, LocalGate
from advisor.loop import TaskLoop
from advisor.pricing import FREE, Price
from advisor.task import Task, TaskError
from advisor.tools.mcp_client import McpPool


class Loops:
    """Endpoints made once per (name, config) and shared by every task; those passed in `given` (by name)
    belong to the caller, the others are closed by `aclose()`. `gate` holds the run's limits."""

    def __init__(
        self,
        *,
        fsync: bool = True,
        given: dict[str, Endpoint] | None = None,
        endpoint_options: dict | None = None,
        gate: CallGate | None = None,
    ):
        self.fsync = fsync
        self.given = dict(given or {})
        self._endpoints: dict[str, Endpoint] = {}
        self._options = endpoint_options or {}
        self.mcp = McpPool()  # MCP servers start once and are shared by the tasks
        self.gate = gate if gate is not None else LocalGate()

    def endpoint(self, name: str, config: EndpointConfig) -> Endpoint:
        if name in self.given:
            return self.given[name]
        key = name + "\x00" + json.dumps(config.model_dump(mode="json"), sort_keys=True)
        if key not in self._endpoints:
            self._endpoints[key] = make_endpoint(name, config, **self._options)
        return self._endpoints[key]

    def _slot(self, task: Task, which: str, role: str) -> Slot | None:
        rc = task.executor if which == "executor" else task.frontier
        if rc is None:
            return None
        cfg = task.endpoints[rc.endpoint]
        price: Price = cfg.price if cfg.price is not None else FREE
        try:
            endpoint = self.endpoint(rc.endpoint, cfg)
        except EndpointError as e:  # e.g. a provider that is not available here: bad input
            raise TaskError(f"{task.source}: endpoints.{rc.endpoint}.provider: {e}") from None
        return Slot(role, endpoint, price, rc.effort)

    def slots(self, task: Task, strategy: str) -> tuple[Slot, Slot | None]:
        """The executor and frontier slots of `task` under `strategy`."""
        frontier = self._slot(task, "frontier", "frontier")
        executor = frontier if strategy == "frontier" else self._slot(task, "executor", "executor")
        assert executor is not None
        return executor, frontier

    def loop_for(
        self,
        task: Task,
        strategy: str,
        out: Path,
        *,
        listeners: list[Callable[[dict], None]],
        gate: CallGate | None = None,
        placement: dict | None = None,
        run_id: str | None = None,
    ) -> TaskLoop:
        """The TaskLoop that runs `task` under `strategy`, writing to `out`; `gate` (default: this one's)
        is asked before each model call, `placement` goes into its result."""
        executor, frontier = self.slots(task, strategy)
        loop = TaskLoop(
            task,
            executor,
            None if strategy == "frontier" else frontier,
            strategy,
            out,
            listeners=listeners,
            fsync=self.fsync,
            mcp=self.mcp,
            gate=self.gate if gate is None else gate,
            placement=placement,
            run_id=run_id,
        )
        if strategy == "frontier" and frontier is not None:
            loop.ledger.frontier_price = frontier.price
        return loop

    async def aclose(self) -> None:
        await self.mcp.aclose()
        for ep in self._endpoints.values():
            await ep.aclose()
        self._endpoints.clear()
