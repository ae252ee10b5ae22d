"""OpenTelemetry: every task a trace, exported over OTLP (http/protobuf) to Jaeger, Langfuse, Phoenix, ...

On with `ADVISOR_OTEL=1`, with `otel:` in an advisor.yaml (`otel: {content: true}` or `otel: true`), or
`Advisor(otel=...)`; the exporter takes the standard `OTEL_EXPORTER_OTLP_*` variables (endpoint, headers,
timeout; default http://localhost:4318/v1/traces) and `OTEL_SERVICE_NAME` (default `advisor`). Off by
default, and then nothing of OpenTelemetry is imported.

The spans are made from the trace events as they happen (`TaskSpans` is one task's trace listener):

    advisor.task <name>                 outcome, strategy, USD total and frontier-only estimate
      advisor.step <n>                  one per loop step
        chat <model>                    a model call: gen_ai.system / request.model / usage.*, ours: role,
                                        purpose, cached tokens, USD, effort
        execute_tool <tool>             a tool call: gen_ai.tool.name, whether it failed
      advisor.consult <trigger>         (under its step) mode, estimated and actual USD; its model call
                                        inside

Prompts, answers, tool arguments and outputs are attributes only with `otel: {content: true}`; API keys are
never in the trace events, so never in a span.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from advisor.task import TaskError
from advisor.version import package_version

ENV = "ADVISOR_OTEL"
CONTENT_LIMIT = 4000  # characters of a prompt or tool output kept per attribute (with content: true)


class OtelConfig(BaseModel):
    """`otel:` in an advisor.yaml."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=True, description="export OpenTelemetry traces")
    content: bool = Field(default=False, description="also export prompts, answers, tool arguments and outputs")
    service_name: str | None = Field(default=None, description="default: $OTEL_SERVICE_NAME, else advisor")


def resolve(value: OtelConfig | dict | bool | None = None) -> OtelConfig | None:
    """The settings in force, or None when off. `ADVISOR_OTEL=0` turns it off whatever the config says;
    else a config value (`otel:` in advisor.yaml, `Advisor(otel=...)`) decides; else `ADVISOR_OTEL=1` turns
    it on with the defaults."""
    flag = os.environ.get(ENV, "").strip().lower()
    if flag in ("0", "false", "no", "off"):
        return None
    if value is None:
        value = flag in ("1", "true", "yes", "on")
    if isinstance(value, bool):
        value = OtelConfig(enabled=value)
    elif isinstance(value, dict):
        try:
            value = OtelConfig.model_validate(value)
        except ValidationError as e:
            err = e.errors()[0]
            where = ".".join(str(x) for x in ("otel", *err["loc"]))
            raise TaskError(f"{where}: {err['msg']} (otel takes enabled, content, service_name)") from None
    return value if value.enabled else None


class Exporter:
    """A tracer provider with a batching OTLP/http exporter; `tracer` for the task listeners."""

    def __init__(self, config: OtelConfig):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.config = config
        service = config.service_name or os.environ.get("OTEL_SERVICE_NAME") or "advisor"
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": service, "service.version": package_version()})
        )
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = self.provider.get_tracer("advisor", package_version())

    def listener(self, goal: str = "") -> TaskSpans:
        return TaskSpans(self.tracer, self.config.content, goal)

    def shutdown(self) -> None:
        """Blocking (sends what is queued): call it from a thread in async code."""
        self.provider.shutdown()


def _ns(t: float) -> int:
    return int(t * 1e9)


def _text(value: Any) -> str:
    import json

    text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
    return text[:CONTENT_LIMIT]


class TaskSpans:
    """One task's trace events -> spans (a trace listener: `listener(event)`)."""

    def __init__(self, tracer: Any, content: bool = False, goal: str = ""):
        self.tracer = tracer
        self.content = content
        self.goal = goal
        self.task = None
        self.step = None
        self.step_no = 0
        self.roles: dict[str, dict] = {}
        self.tools: dict[str, Any] = {}  # open tool spans by call id
        self.consult_call: tuple[dict, float] | None = None  # a consult's model call, until its event

    def _ctx(self, parent):
        from opentelemetry import trace

        return trace.set_span_in_context(parent) if parent is not None else None

    def __call__(self, event: dict) -> None:
        kind, t = event["type"], event["t"]
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None and (self.task is not None or kind == "task_start"):
            handler(event, t)

    # -- the task and its steps ----------------------------------------------------------------
    def _on_task_start(self, e: dict, t: float) -> None:
        self.roles = {r: (e.get(r) or {}) for r in ("executor", "frontier")}
        attrs = {"advisor.task": e.get("task", ""), "advisor.strategy": e.get("strategy", "")}
        for role, info in self.roles.items():
            if info:
                attrs[f"advisor.{role}.model"] = info.get("model", "")
        if self.content and self.goal:
            attrs["advisor.goal"] = _text(self.goal)
        self.task = self.tracer.start_span(f"advisor.task {e.get('task')}", start_time=_ns(t), attributes=attrs)

    def _open_step(self, step: int, start: float) -> None:
        if step <= self.step_no or step <= 0:
            return
        if self.step is not None:
            self.step.end(end_time=_ns(start))
        self.step_no = step
        self.step = self.tracer.start_span(
            f"advisor.step {step}",
            context=self._ctx(self.task),
            start_time=_ns(start),
            attributes={"advisor.step": step},
        )

    def _parent(self):
        return self.step if self.step is not None else self.task

    def _on_task_end(self, e: dict, t: float) -> None:
        from opentelemetry.trace import Status, StatusCode

        for span in self.tools.values():
            span.end(end_time=_ns(t))
        if self.step is not None:
            self.step.end(end_time=_ns(t))
        result = e.get("result") or {}
        cost = result.get("cost_usd") or {}
        self.task.set_attributes(
            {
                "advisor.outcome": e.get("outcome", ""),
                "advisor.steps": int(result.get("steps") or 0),
                "advisor.consults": int(result.get("consults") or 0),
                "advisor.cost_usd": float(cost.get("total") or 0.0),
                "advisor.frontier_only_estimate_usd": float(cost.get("frontier_only_estimate") or 0.0),
            }
        )
        if e.get("error"):
            self.task.set_attribute("advisor.error", str(e["error"])[:500])
        if e.get("outcome") == "error":
            self.task.set_status(Status(StatusCode.ERROR, str(e.get("error") or "")[:200]))
        self.task.end(end_time=_ns(t))
        self.task = self.step = None

    # -- model calls -----------------------------------------------------------------------------
    def _on_model_call(self, e: dict, t: float) -> None:
        start = t - float(e.get("latency_s") or 0.0)
        if e.get("purpose") == "consult":  # its span goes inside the consult's, made at the consult event
            self.consult_call = (e, start)
            return
        self._open_step(int(e.get("step") or 0), start)
        self._chat_span(e, start, t, self._parent())

    def _chat_span(self, e: dict, start: float, end: float, parent) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        usage = e.get("usage") or {}
        role = e.get("role", "")
        info = self.roles.get(role) or {}
        attrs = {
            "gen_ai.operation.name": "chat",
            "gen_ai.system": info.get("provider") or "openai",
            "gen_ai.request.model": e.get("model") or "",
            "gen_ai.usage.input_tokens": int(usage.get("input", 0)) + int(usage.get("cached_input", 0))
            + int(usage.get("cache_write", 0)),
            "gen_ai.usage.output_tokens": int(usage.get("output", 0)) + int(usage.get("reasoning", 0)),
            "advisor.role": role,
            "advisor.purpose": e.get("purpose") or "",
            "advisor.endpoint": e.get("endpoint") or "",
            "advisor.usage.cached_input_tokens": int(usage.get("cached_input", 0)),
            "advisor.usage.reasoning_tokens": int(usage.get("reasoning", 0)),
            "advisor.cost_usd": float(e.get("cost_usd") or 0.0),
            "advisor.effort": info.get("effort") or "",
        }
        if e.get("finish_reason"):
            attrs["gen_ai.response.finish_reasons"] = [str(e["finish_reason"])]
        span = self.tracer.start_span(
            f"chat {e.get('model')}",
            context=self._ctx(parent),
            kind=SpanKind.CLIENT,
            start_time=_ns(start),
            attributes=attrs,
        )
        if e.get("error"):
            span.set_attribute("error.type", "endpoint_error")
            span.set_status(Status(StatusCode.ERROR, str(e["error"])[:200]))
        span.end(end_time=_ns(end))

    # -- tools -----------------------------------------------------------------------------------
    def _on_tool_call(self, e: dict, t: float) -> None:
        self._open_step(int(e.get("step") or 0), t)
        attrs = {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": e.get("name") or "",
            "gen_ai.tool.call.id": e.get("id") or "",
        }
        if self.content:
            attrs["gen_ai.tool.call.arguments"] = _text(e.get("arguments"))
        self.tools[e.get("id") or ""] = self.tracer.start_span(
            f"execute_tool {e.get('name')}", context=self._ctx(self._parent()), start_time=_ns(t), attributes=attrs
        )

    def _on_tool_result(self, e: dict, t: float) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self.tools.pop(e.get("id") or "", None)
        if span is None:
            return
        span.set_attribute("advisor.tool.is_error", bool(e.get("is_error")))
        if self.content:
            span.set_attribute("gen_ai.tool.call.result", _text(e.get("text", "")))
        if e.get("is_error"):
            span.set_attribute("error.type", "tool_error")
            span.set_status(Status(StatusCode.ERROR))
        span.end(end_time=_ns(t))

    # -- consults and answers ------------------------------------------------------------------
    def _on_consult(self, e: dict, t: float) -> None:
        call, self.consult_call = self.consult_call, None
        start = call[1] if call is not None else t
        attrs = {
            "advisor.consult.trigger": e.get("trigger") or "",
            "advisor.consult.mode": e.get("mode") or "",
            "advisor.consult.estimated_cost_usd": float(e.get("estimated_cost_usd") or 0.0),
            "advisor.cost_usd": float((call[0].get("cost_usd") if call else 0.0) or 0.0),
        }
        if self.content and e.get("advice"):
            attrs["advisor.consult.advice"] = _text(e["advice"])
        span = self.tracer.start_span(
            f"advisor.consult {e.get('trigger')}",
            context=self._ctx(self._parent()),
            start_time=_ns(start),
            attributes=attrs,
        )
        if call is not None:
            self._chat_span(call[0], call[1], t, span)
        span.end(end_time=_ns(t))

    def _on_consult_skipped(self, e: dict, t: float) -> None:
        self._parent().add_event(
            "advisor.consult_skipped",
            {"advisor.consult.trigger": e.get("trigger") or "", "advisor.consult.skip_reason": e.get("reason") or ""},
            timestamp=_ns(t),
        )

    def _on_answer(self, e: dict, t: float) -> None:
        attrs = {"advisor.answer.by": e.get("by") or ""}
        if self.content:
            attrs["advisor.answer"] = _text(e.get("answer") or "")
        self._parent().add_event("advisor.answer", attrs, timestamp=_ns(t))

    def _on_check(self, e: dict, t: float) -> None:
        self._parent().add_event(
            "advisor.check", {"advisor.check.passed": bool(e.get("passed"))}, timestamp=_ns(t)
        )
