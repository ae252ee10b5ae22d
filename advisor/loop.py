"""The Advisor-Mode loop for one task: plan -> executor steps -> answer -> check, with consults.

The executor makes the tool calls. The frontier is consulted at the configured inflection points
(plan, replan, final) and after `after_failures` consecutive failed steps, each consult priced
before it is made. Every event goes to the trace as it happens.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from advisor.checks import extract_answer, run_check
from advisor.consult import (
    ADVISOR_TOOL,
    ConsultBrief,
    Consulted,
    Slot,
    advice_entry,
    advisor_tool_spec,
    consult,
    digest_entry,
)
from advisor.endpoints.base import ChatRequest, EndpointError
from advisor.escalation import EscalationPolicy, TurnState
from advisor.ledger import Ledger
from advisor.limits import CallGate, SpendLimitReached
from advisor.messages import (
    Attempt,
    Message,
    ModelResponse,
    TextPart,
    ToolCall,
    Usage,
    without_images,
)
from advisor.prompts import render
from advisor.repeats import CallRepeats, call_key
from advisor.result import TaskResult
from advisor.task import AdvisorTool, Escalation, Task
from advisor.tools.images import ImageLedger
from advisor.tools.mcp_client import McpError, McpPool
from advisor.tools.profiles import profile_for
from advisor.tools.spec import ToolContext, ToolResult, ToolSpec
from advisor.trace import Listener, Trace
from advisor.workspace import Snapshot, WorkspaceError, fill_from_folder, fill_from_git, snapshot
from advisor.workspace import diff as workspace_diff

TEXT_IN_TRACE = 2000  # tool output kept in the trace per call; the model sees its own truncation
POLICY_STRATEGIES = ("advisor", "combined")  # the escalation policy's triggers consult
TOOL_STRATEGIES = (
    "advisor-tool",
    "combined",
)  # the executor gets the advisor tool even when task.yaml has none


def offers_advisor_tool(strategy: str, escalation: Escalation) -> bool:
    """Whether the executor gets the `advisor` tool: always under advisor-tool and combined, and under
    advisor when task.yaml configures `escalation.advisor_tool`."""
    return strategy in TOOL_STRATEGIES or (strategy == "advisor" and escalation.advisor_tool is not None)


class _Stop(Exception):
    def __init__(self, outcome: str, detail: str | None = None):
        super().__init__(detail or outcome)
        self.outcome = outcome
        self.detail = detail


def tool_images_note(images: ImageLedger, ids: list[str]) -> str:
    """The user message that follows a turn's tool results when they made images (it carries their pixels
    too, where the model takes them)."""
    return "Images from the tools: " + "; ".join(images.describe(i) for i in ids)


@dataclass
class TaskLoop:
    task: Task
    executor: Slot
    frontier: Slot | None
    strategy: str
    out_dir: Path
    listeners: list[Listener] = field(default_factory=list)
    fsync: bool = True
    mcp: McpPool | None = None  # shared MCP servers (Advisor's); None: the task starts and stops its own
    run_id: str | None = None  # the run this task belongs to (`task_start.run_id`)
    gate: CallGate | None = None  # the run's limits (endpoint concurrency, run budget), asked before each call
    placement: dict | None = None  # where the task ran (a Ray worker's node and host), kept in result.json

    def __post_init__(self) -> None:
        self.trace = Trace(self.out_dir / "trace.jsonl", fsync=self.fsync, listeners=self.listeners)
        self.ledger = Ledger(frontier_price=self.frontier.price if self.frontier else None)
        self.policy = EscalationPolicy(
            self.task.escalation,
            enabled=self.strategy in POLICY_STRATEGIES and self.frontier is not None,
            calls=CallRepeats(self.task.budget.max_repeated_failures),
        )
        self.turn = TurnState()
        self.tools: list[ToolSpec] = self.task.tool_specs()
        self.advisor_tool: AdvisorTool | None = None  # the executor's own consults: settings, when offered
        if self.frontier is not None and offers_advisor_tool(self.strategy, self.task.escalation):
            self.advisor_tool = self.task.escalation.advisor_tool or AdvisorTool()
            self.tools.append(advisor_tool_spec())
        self.advisor_uses = 0
        self.by_name = {t.name: t for t in self.tools}
        self.steps = 0
        self._opening = 0  # set when the steps start: the messages before the first step
        self.model_calls = 0
        self.answer: str | None = None
        self.digest: list[str] = []
        self.consults_by_trigger: dict[str, int] = {}  # consults made, by trigger (result.json)
        self.started = time.monotonic()
        self.images = ImageLedger()
        self.shell = self.task.shell.settings()
        self.workspace = self.out_dir / "workspace"
        self.start_files: Snapshot | None = None

    # -- limits and calls -------------------------------------------------------------------
    def _check_limits(self) -> None:
        b = self.task.budget
        if self.ledger.total_usd >= b.max_usd:
            self.trace.emit("budget_exceeded", limit="max_usd", value=self.ledger.total_usd)
            raise _Stop("budget_exceeded", f"max_usd {b.max_usd} reached")
        elapsed = time.monotonic() - self.started
        if elapsed >= b.max_wall_s:
            self.trace.emit("budget_exceeded", limit="max_wall_s", value=elapsed)
            raise _Stop("budget_exceeded", f"max_wall_s {b.max_wall_s} reached")

    async def _call(
        self,
        slot: Slot,
        purpose: str,
        messages: list[Message],
        tools: list[ToolSpec] | None,
        max_tokens: int | None = None,
    ) -> ModelResponse:
        self._check_limits()
        if self.gate is None:
            return await self._send(slot, purpose, messages, tools, max_tokens)
        try:
            permit = await self.gate.acquire(slot.endpoint.name, slot.endpoint.config.max_concurrency)
        except SpendLimitReached as e:
            self.trace.emit("budget_exceeded", limit="run_max_usd", value=e.spent)
            raise _Stop("budget_exceeded", str(e)) from None
        booked = len(self.ledger.calls)
        try:
            return await self._send(slot, purpose, messages, tools, max_tokens)
        finally:  # what this call cost (billed even when it failed) goes to the run's spend
            await self.gate.release(permit, sum(c.cost_usd for c in self.ledger.calls[booked:]))

    async def _send(
        self,
        slot: Slot,
        purpose: str,
        messages: list[Message],
        tools: list[ToolSpec] | None,
        max_tokens: int | None,
    ) -> ModelResponse:
        attempts: list[Attempt] = []
        remaining = self.task.budget.max_wall_s - (time.monotonic() - self.started)
        self.model_calls += 1
        base = {
            "role": slot.role,
            "purpose": purpose,
            "endpoint": slot.endpoint.name,
            "model": slot.endpoint.config.model,
            "step": self.steps,
        }
        if not slot.endpoint.config.vision:
            messages = without_images(messages)
        try:
            resp = await asyncio.wait_for(
                slot.endpoint.complete(
                    ChatRequest(messages, tools=tools or None, effort=slot.effort, max_tokens=max_tokens),
                    on_attempt=attempts.append,
                ),
                timeout=max(remaining, 0.001),
            )
        except (EndpointError, TimeoutError) as e:
            # the error's own list is complete; the hook's list covers errors that carry none
            attempts = list(getattr(e, "attempts", None) or attempts)
            usage = Usage()
            for a in attempts:
                if a.usage is not None:
                    usage = usage + a.usage
            rec = self.ledger.record(slot.role, slot.endpoint.name, purpose, usage, slot.price)
            error = (
                str(e)
                if isinstance(e, EndpointError)
                else f"max_wall_s {self.task.budget.max_wall_s} reached"
            )
            self.trace.emit(
                "model_call",
                **base,
                usage=usage.as_dict(),
                cost_usd=rec.cost_usd,
                latency_s=None,
                finish_reason=None,
                attempts=[_attempt(a) for a in attempts],
                error=error,
            )
            if isinstance(e, TimeoutError):
                self.trace.emit("budget_exceeded", limit="max_wall_s", value=time.monotonic() - self.started)
                raise _Stop("budget_exceeded", error) from None
            raise _Stop("error", error) from None
        rec = self.ledger.record(slot.role, slot.endpoint.name, purpose, resp.usage, slot.price)
        self.trace.emit(
            "model_call",
            **base,
            usage=resp.usage.as_dict(),
            cost_usd=rec.cost_usd,
            latency_s=resp.latency_s,
            finish_reason=resp.finish_reason,
            attempts=[_attempt(a) for a in resp.attempts],
            error=None,
        )
        return resp

    # -- set-up ----------------------------------------------------------------------------
    def _prepare(self) -> list[Message]:
        source = self.task.workspace_source()
        if source is not None and source[0] == "git":
            fill_from_git(source[1], source[2] or "HEAD", self.workspace)
        elif source is not None:
            fill_from_folder(source[1], self.workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        for src in self.task.input_paths("files"):
            shutil.copy2(src, self.workspace / src.name)
        self.start_files = snapshot(self.workspace)  # what the final diff is taken against
        if self.task.check.type == "command" or {"shell", "python"} & {t.name for t in self.tools}:
            _announce_sandbox(self.task.shell.sandbox)
        ids = [self.images.load(p) for p in self.task.input_paths("images")]
        cfg = self.executor.endpoint.config
        self.profile = profile_for(cfg.model, cfg.provider)
        system = render(
            "executor_system",
            tools=[t.name for t in self.tools],
            has_images=bool(ids),
        )
        user = render(
            "task_user",
            goal=self.task.goal.strip(),
            images=[self.images.describe(i) for i in ids],
            files=[p.name for p in self.task.input_paths("files")],
        )
        parts = [self.images.to_image_part(i, self.profile) for i in ids]
        return [Message.system(system), Message.user(user, parts)]

    # -- the loop --------------------------------------------------------------------------
    async def run(self) -> TaskResult:
        outcome, error = "failed", None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.trace.emit(
            "task_start",
            task=self.task.name,
            run_id=self.run_id,
            strategy=self.strategy,
            executor=self._role_info(self.executor),
            frontier=self._role_info(self.frontier),
            budget=self.task.budget.model_dump(),
            escalation=self.task.escalation.model_dump(),
            prices={
                s.endpoint.name: (
                    None
                    if s.endpoint.config.free and s.endpoint.config.price is None
                    else s.price.model_dump()
                )
                for s in (self.executor, self.frontier)
                if s is not None
            },
            **(self.placement or {}),  # on Ray: the node and host, from the first line on
        )
        own_pool = None
        try:
            if self.task.mcp_servers:
                own_pool = await self._connect_mcp()
            # file copies, image decoding and encoding are blocking work: off the event loop
            messages = await asyncio.to_thread(self._prepare)
            outcome = await self._steps(messages)
        except _Stop as stop:
            outcome, error = stop.outcome, stop.detail
        except WorkspaceError as e:
            outcome, error = "error", f"workspace: {e}"
        except Exception as e:  # a crash in a tool or our code ends this task, not the whole run
            outcome, error = "error", f"{type(e).__name__}: {e}"
        if own_pool is not None:
            await own_pool.aclose()
        changes = await asyncio.to_thread(self._workspace_diff)
        result = TaskResult(
            task=self.task.name,
            strategy=self.strategy,
            outcome=outcome,
            answer=self.answer,
            error=error,
            steps=self.steps,
            consults=self.policy.consults,
            skipped_consults=self.policy.skipped,
            consults_by_trigger=dict(self.consults_by_trigger),
            model_calls=self.model_calls,
            wall_s=round(time.monotonic() - self.started, 3),
            tokens=self.ledger.tokens_dict(),
            cost_usd=self.ledger.cost_dict(),
            out_dir=str(self.out_dir),
            workspace_diff=changes,
            **(self.placement or {}),
        )
        self.trace.emit("task_end", outcome=outcome, error=error, result=result.to_dict())
        await asyncio.to_thread(self._finish, result)
        return result

    async def _connect_mcp(self) -> McpPool | None:
        """Adds the task's MCP servers' tools (starting servers not yet running); returns a pool of our own
        to close at the end when no shared one was given."""
        own = McpPool() if self.mcp is None else None
        pool = self.mcp or own
        assert pool is not None
        try:
            specs = await pool.tools_for(self.task.mcp_servers, set(self.by_name), str(self.task.base_dir))
        except McpError as e:
            if own is not None:
                await own.aclose()
            raise _Stop("error", str(e)) from None
        self.tools += specs
        self.by_name.update((t.name, t) for t in specs)
        self.trace.emit(
            "mcp_tools",
            servers={
                name: {"transport": "stdio" if cfg.command else "http", "env": cfg.env}
                for name, cfg in self.task.mcp_servers.items()
            },
            tools={t.name: t.server for t in specs},
        )
        return own

    def _workspace_diff(self) -> str | None:
        if self.start_files is None or not self.workspace.is_dir():
            return None
        exported = {f"images/{i}.png" for i in self.images.ids()}  # the python tool's copies of the inputs
        return workspace_diff(self.workspace, self.start_files, ignore=exported) or None  # null: no change

    def _finish(self, result: TaskResult) -> None:
        self.trace.close()
        result.write(self.out_dir)

    async def _steps(self, messages: list[Message]) -> str:
        policy, turn = self.policy, self.turn
        self._opening = len(messages)  # system prompt, goal, images: where a restart consult starts over
        if policy.wants("plan"):
            turn.apply((await self._consult("plan", messages)).outcome)
        while True:
            if self.steps >= self.task.budget.max_steps:
                self.trace.emit("budget_exceeded", limit="max_steps", value=self.steps)
                return "budget_exceeded"
            self._check_limits()  # before counting: a step is a call actually made
            self.steps += 1
            by_frontier, handback = turn.start_step(self.frontier is not None)
            acting = self.frontier if by_frontier else self.executor
            if handback and policy.notes_handback:
                messages.append(Message.user(render("handback")))
            resp = await self._call(acting, "takeover" if by_frontier else "step", messages, self.tools)
            msg = resp.message
            messages.append(msg)
            if msg.tool_calls:
                failure = await self._run_tools(msg.tool_calls, messages)
                if failure is None:
                    policy.success()
                elif policy.failure(self.steps, *failure, self.trace):
                    turn.apply((await self._consult("failures", messages, detail=failure[1])).outcome)
                continue
            answer = extract_answer(msg.text)
            if not answer:
                messages.append(Message.user(render("empty_reply")))
                if policy.failure(self.steps, "no_progress", "empty reply", self.trace):
                    turn.apply((await self._consult("failures", messages, detail="empty reply")).outcome)
                continue
            self.answer = answer
            by = "frontier" if by_frontier else "executor"
            self.trace.emit("answer", step=self.steps, answer=answer, by=by)
            if by == "executor" and policy.wants("final") and not policy.final_done:
                policy.final_done = True
                review = (await self._consult("final", messages, answer=answer)).outcome
                turn.apply(review)
                if review.kind == "objected" or turn.takeover_left:
                    continue  # the objection's advice is in context: the executor goes on
            check = await run_check(
                self.task.check, answer, self.task.base_dir, self.workspace, self.task.shell
            )
            # `check_type`, not `type`: the event's own `type` key is "check"
            self.trace.emit(
                "check", check_type=self.task.check.type, passed=check.passed, detail=check.detail
            )
            if check.passed:
                return "passed"
            turn.rejected += 1
            if turn.rejected >= self.task.check.max_attempts:
                raise _Stop("failed", _rejected(turn.rejected, check.detail))
            output = check.detail if self.task.check.type == "command" else None
            messages.append(Message.user(render("check_rejected", answer=answer, output=output)))
            due = policy.failure(self.steps, "check_rejected", check.detail, self.trace)
            if policy.wants("replan"):
                turn.apply(
                    (await self._consult("replan", messages, answer=answer, detail=check.detail)).outcome
                )
            elif due:
                turn.apply((await self._consult("failures", messages, detail=check.detail)).outcome)

    async def _run_tools(self, calls: list[ToolCall], messages: list[Message]) -> tuple[str, str] | None:
        """Runs a turn's tool calls in order; returns the first failure (reason, detail) or None.

        A malformed call (unparseable arguments, no usable name) does not stay in the history as a
        structured tool call: no provider's format can carry it (an empty name fails to render, broken
        JSON is rejected). Its raw markup stays in the assistant's text and its error follows as a user
        message, so the tool-call / tool-result pairing of the rest stays valid everywhere.
        """
        failure: tuple[str, str] | None = None
        new_images: list[str] = []
        malformed: list[str] = []
        ctx = ToolContext(workspace=self.workspace, images=self.images, extra={"shell": self.shell})
        assistant = messages[-1]
        bad = [tc for tc in calls if tc.parse_error is not None or tc.arguments is None]
        if bad:
            assistant.tool_calls = [tc for tc in assistant.tool_calls if tc not in bad]
            raw = "\n".join(tc.raw_arguments or f"<call to {tc.name or '?'}>" for tc in bad)
            assistant.content = [*assistant.content, TextPart(raw)]
        for tc in calls:
            self.trace.emit(
                "tool_call",
                step=self.steps,
                id=tc.id,
                name=tc.name,
                arguments=tc.arguments if tc.arguments is not None else tc.raw_arguments,
            )
            reason, produced, data = None, [], None
            # a broken call repeats as its raw text; a call to a tool that is not offered, as its name
            args = tc.arguments if tc.parse_error is None and tc.arguments is not None else tc.raw_arguments
            repeats, key = self.policy.calls, call_key(tc.name, args, tc.name in self.by_name)
            if tc.parse_error is not None or tc.arguments is None:
                text, reason = (
                    f"error: malformed tool call: {tc.parse_error or 'arguments could not be parsed'}",
                    "malformed_tool_call",
                )
            elif tc.name == ADVISOR_TOOL and self.advisor_tool is not None:
                text, failed = await self._advisor_call(messages)
                reason = "tool_error" if failed else None
            elif tc.name not in self.by_name:
                known = ", ".join(self.by_name) or "none"
                text, reason = f"error: unknown tool '{tc.name}'; available tools: {known}", "unknown_tool"
            elif refusal := repeats.refusal(key):
                text, reason = refusal, "repeated_call"
            else:
                spec = self.by_name[tc.name]
                result = await self._invoke_within_budget(spec, tc.arguments, ctx)
                text = result.text
                if result.is_error:
                    reason = failure_reason(result)
                else:
                    if spec.changes_workspace:  # e.g. an edit: re-running the failed tests is progress
                        repeats.forget()
                    repeats.succeeded(key)
                produced = [i for i, _ in result.images]
                data = _trace_data(result.data)
                new_images += produced
            stuck = (
                reason is not None
                and bool(tc.name)
                and tc.name != ADVISOR_TOOL
                and repeats.failed(key) >= repeats.limit
            )
            self.trace.emit(
                "tool_result",
                step=self.steps,
                id=tc.id,
                name=tc.name,
                is_error=reason is not None,
                text=text[:TEXT_IN_TRACE],
                images=produced,
                data=data,
            )
            if reason == "malformed_tool_call":
                malformed.append(text)
            else:
                messages.append(Message.tool(tc.id, tc.name, text, is_error=reason is not None))
            self.digest.append(digest_entry(tc.name, tc.arguments, tc.raw_arguments, text, step=self.steps))
            # failure_signals decide; an advisor call the consult budget refused is not the executor failing
            if reason and failure is None and tc.name != ADVISOR_TOOL and self.policy.counts(reason):
                failure = (reason, text[:300])
            if stuck:  # the model is looping on a call that cannot work: stop before the limits do
                args = "" if tc.name not in self.by_name else json.dumps(args, default=str)[:200]
                detail = (
                    f"the same failing tool call was made {repeats.failures[key]} times: {tc.name}({args})"
                )
                self.policy.failure(self.steps, reason, text[:300], self.trace)
                self.trace.emit(
                    "stuck", step=self.steps, name=tc.name, times=repeats.failures[key], detail=detail
                )
                raise _Stop("failed", detail)
        if malformed:
            messages.append(Message.user("\n".join(malformed)))
        if new_images:
            # OpenAI tool messages cannot carry images: they follow in a user message.
            parts = await asyncio.to_thread(
                lambda: [self.images.to_image_part(i, self.profile) for i in new_images]
            )
            messages.append(Message.user(tool_images_note(self.images, new_images), parts))
        return failure

    async def _invoke_within_budget(self, spec: ToolSpec, arguments: dict, ctx: ToolContext) -> ToolResult:
        remaining = self.task.budget.max_wall_s - (time.monotonic() - self.started)
        try:
            return await asyncio.wait_for(_invoke(spec, arguments, ctx), timeout=max(remaining, 0.001))
        except TimeoutError:
            elapsed = time.monotonic() - self.started
            self.trace.emit("budget_exceeded", limit="max_wall_s", value=elapsed)
            raise _Stop(
                "budget_exceeded", f"max_wall_s {self.task.budget.max_wall_s} reached in tool {spec.name}"
            ) from None

    async def _advisor_call(self, messages: list[Message]) -> tuple[str, bool]:
        """The executor called `advisor`: (the tool result, whether it is an error). The advice is the
        result; past max_uses, a consult the budget refuses or a frontier that fails are errors, and the
        task goes on."""
        assert self.advisor_tool is not None
        cfg = self.advisor_tool
        if self.advisor_uses >= cfg.max_uses:
            self.policy.skipped += 1
            self.trace.emit(
                "consult_skipped", step=self.steps, trigger="tool", reason="max_uses", estimated_cost_usd=0.0
            )
            return (
                f"error: advisor: max_uses_exceeded (the advisor may be called {cfg.max_uses} times per task); go on without it",
                True,
            )
        self.advisor_uses += 1
        try:
            done = await self._consult("tool", messages, max_tokens=cfg.max_tokens)
        except _Stop as stop:
            if stop.outcome != "error":
                raise
            # the consult was made and failed: its event says so (its model_call event has the error)
            self.trace.emit(
                "consult",
                step=self.steps,
                trigger="tool",
                mode="advise",
                estimated_cost_usd=None,
                advice=None,
                error=stop.detail,
            )
            return f"error: advisor: unavailable ({stop.detail}); go on without it", True
        if done.kind == "skipped":
            return f"error: advisor: unavailable ({done.outcome.skip_reason} reached); go on without it", True
        return done.advice or "(the advisor gave no advice)", False

    async def _consult(
        self,
        trigger: str,
        messages: list[Message],
        answer: str | None = None,
        detail: str = "",
        max_tokens: int | None = None,
    ) -> Consulted:
        """Consults the frontier at `trigger` (the consult core, `advisor.consult`); what this loop does
        with the outcome: trace it, and put the advice or the takeover note into the conversation (the
        executor's own call, trigger `tool`, gets the advice as its tool result instead)."""
        assert self.frontier is not None
        frontier = self.frontier
        made = self.policy.consults
        try:
            done = await consult(
                self._brief(trigger, answer, detail),
                policy=self.policy,
                frontier=frontier,
                ledger=self.ledger,
                max_usd=self.task.budget.max_usd,
                conversation=messages,
                opening=self._opening,
                call=lambda req: self._call(
                    frontier, "consult", req.messages, None, max_tokens=req.max_tokens
                ),
                max_tokens=max_tokens,
            )
        finally:  # a consult counts once it is made, also when the frontier then fails
            if self.policy.consults > made:
                self.consults_by_trigger[trigger] = self.consults_by_trigger.get(trigger, 0) + 1
        outcome = done.outcome
        if outcome.kind == "skipped":
            self.trace.emit(
                "consult_skipped",
                step=self.steps,
                trigger=trigger,
                reason=outcome.skip_reason,
                estimated_cost_usd=done.estimate_usd,
            )
            return done
        self.trace.emit(
            "consult",
            step=self.steps,
            trigger=trigger,
            mode=done.mode,
            estimated_cost_usd=done.estimate_usd,
            advice=done.advice[:TEXT_IN_TRACE] if done.advice is not None else None,
        )
        if outcome.kind == "takeover":  # the frontier acts in the executor's conversation
            if (
                done.mode == "restart"
            ):  # the failed attempt leaves the context (the trace keeps it); files stay
                self.trace.emit("restart", step=self.steps, dropped_messages=len(messages) - self._opening)
                del messages[self._opening :]
            else:
                messages.append(
                    Message.user(render("takeover", steps=outcome.takeover_steps, trigger=trigger))
                )
            return done
        if outcome.kind != "approved" and trigger != "tool":
            assert done.advice is not None
            messages.append(Message.user(render("advice", trigger=trigger, advice=done.advice)))
            self.digest.append(advice_entry(trigger, done.advice))
        return done

    def _brief(self, trigger: str, answer: str | None = None, detail: str = "") -> ConsultBrief:
        return ConsultBrief(
            trigger,
            goal=self.task.goal.strip(),
            tools=[t.name for t in self.tools],
            # the whole digest, append-only, so each consult's request extends the last one's bytes
            # (provider prompt caches hit); each entry is already compact
            digest="\n".join(self.digest),
            failures=self.policy.consecutive,
            answer=answer,
            detail=detail,
        )

    @staticmethod
    def _role_info(slot: Slot | None) -> dict | None:
        if slot is None:
            return None
        return {
            "endpoint": slot.endpoint.name,
            "model": slot.endpoint.config.model,
            "provider": slot.endpoint.config.provider,
            "effort": slot.effort,
            "role": slot.role,
        }


async def _invoke(spec: ToolSpec, arguments: dict, ctx: ToolContext) -> ToolResult:
    """A tool that raises is a failed step the model hears about, not the end of the task."""
    try:
        return await spec.invoke(arguments, ctx)
    except Exception as e:
        return ToolResult.error(f"{spec.name} raised {type(e).__name__}: {str(e)[:500]}")


def _rejected(times: int, detail: str | None) -> str:
    """A failed task's `error`: why it ended, in one line."""
    first = (detail or "").strip().splitlines()[0][:200] if (detail or "").strip() else ""
    return f"the check rejected the answer {times} time{'s' * (times != 1)} (check.max_attempts)" + (
        f": {first}" if first else ""
    )


def failure_reason(result: ToolResult) -> str:
    """nonzero_exit for a command that ran and exited non-zero (its data says so), else tool_error."""
    data = result.data if isinstance(result.data, dict) else {}
    code = data.get("exit_code")
    return "nonzero_exit" if isinstance(code, int) and code != 0 else "tool_error"


def _trace_data(data: object) -> object:
    """A tool's structured result (exit code, truncation counts, the edit made) as the trace keeps it:
    JSON values only, and small."""
    try:
        text = json.dumps(data)
    except (TypeError, ValueError):
        return None
    return data if len(text) <= TEXT_IN_TRACE else None


def _attempt(a: Attempt) -> dict:
    return {
        "number": a.number,
        "ok": a.ok,
        "status": a.status,
        "error": a.error,
        "retry_after_s": a.retry_after_s,
        "latency_s": a.latency_s,
        "usage": a.usage.as_dict() if a.usage else None,
    }


def _announce_sandbox(mode: str) -> None:
    """One line on stderr at the start when the code tools' sandbox lacks a protection here."""
    from advisor.tools import confine

    try:
        confine.announce(confine.resolve(mode))
    except confine.SandboxUnavailable:
        pass  # the tools say it in their results; the task was checked when loaded
