"""`advisor check ENDPOINTS.yaml`: is each endpoint ready? One line per endpoint, before any task pays.

For each: whether its key variable is set (the key itself is never printed), whether the server answers
(its model list), whether the model is among those it lists, a one-token round trip (latency and the
usage the server reports) and whether the price is known. A check that fails stops that endpoint's later
ones (there is no round trip to try without a key or a server). The embedded provider has no key or
server: its checkpoint is resolved and the round trip loads it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from advisor.endpoints import EndpointConfig, EndpointError, make_endpoint
from advisor.endpoints.http import HTTPEndpoint
from advisor.messages import Message
from advisor.pricing import known_price, per_million
from advisor.task import TaskError, load_task, read_endpoints, read_yaml


@dataclass
class EndpointReport:
    name: str
    ok: bool = True
    notes: list[str] = field(default_factory=list)

    def good(self, note: str) -> None:
        self.notes.append(note)

    def bad(self, note: str) -> None:
        self.ok = False
        self.notes.append(note)

    def line(self) -> str:
        return f"{self.name}: {'ok' if self.ok else 'FAILED'}: " + "; ".join(self.notes)


def load_endpoints(path: Path) -> dict[str, EndpointConfig]:
    """The endpoints of an advisor.yaml (only `endpoints:`), or of a task file (its own and those beside it)."""
    if not path.is_file():
        raise TaskError(f"{path}: file not found")
    data = read_yaml(path)
    if isinstance(data, dict) and set(data) <= {"endpoints"}:
        endpoints = read_endpoints(path)
    else:
        endpoints = load_task(path, check_env=False, strategies=()).endpoints
    if not endpoints:
        raise TaskError(f"{path}: no endpoints in it (an advisor.yaml holds `endpoints: {{name: {{...}}}}`)")
    return endpoints


def _models_url(ep: HTTPEndpoint) -> str:
    # OpenAI-compatible base URLs end at the API root (.../v1); Anthropic's is the host
    return f"{ep.base_url}/models" if ep.config.provider == "openai" else f"{ep.base_url}/v1/models"


async def _listed_models(ep: HTTPEndpoint, report: EndpointReport) -> list[str] | None:
    """The model ids the server lists; None (after noting why) when the check cannot go on."""
    url = _models_url(ep)
    try:
        response = await ep.client().get(url, headers=ep.headers(), timeout=min(ep.config.timeout_s, 30.0))
    except httpx.HTTPError as e:
        report.bad(f"server not reachable at {ep.base_url} ({type(e).__name__})")
        return None
    if response.status_code in (401, 403):
        report.bad(f"server refused the key (HTTP {response.status_code} from {url})")
        return None
    if response.status_code >= 400:  # some servers have no model list: the round trip still tells
        report.good(f"server answers (no model list: HTTP {response.status_code} from {url})")
        return []
    try:
        ids = [m["id"] for m in response.json().get("data", []) if isinstance(m, dict) and "id" in m]
    except (ValueError, AttributeError):
        ids = []
    report.good(f"server answers at {ep.base_url}")
    return ids


async def check_endpoint(name: str, config: EndpointConfig, timeout_s: float = 60.0) -> EndpointReport:
    report = EndpointReport(name)
    config = config.model_copy(update={"max_retries": 0, "timeout_s": min(config.timeout_s, timeout_s)})
    try:
        endpoint = make_endpoint(name, config)
    except EndpointError as e:
        report.bad(str(e))
        return report
    try:
        if isinstance(endpoint, HTTPEndpoint):
            env = config.api_key_env
            if env:
                try:
                    endpoint.api_key()
                except EndpointError:
                    report.bad(f"key variable {env} is not set")
                    return _price(report, config)
                report.good(f"key variable {env} set")
            else:
                report.good("no key (api_key_env not set)")
            ids = await _listed_models(endpoint, report)
            if ids is None:
                return _price(report, config)
            if ids and config.model not in ids:
                shown = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
                report.bad(f"model {config.model!r} not among the {len(ids)} the server lists ({shown})")
                return _price(report, config)
            if ids:
                report.good(f"model {config.model} listed")
        else:
            from advisor.endpoints.embedded import resolve_model

            try:
                report.good(f"checkpoint {resolve_model(config.model)}")
            except FileNotFoundError as e:
                report.bad(str(e))
                return _price(report, config)
        await _round_trip(endpoint, report)
    finally:
        await endpoint.aclose()
    return _price(report, config)


async def _round_trip(endpoint, report: EndpointReport) -> None:
    start = time.perf_counter()
    try:
        response = await endpoint.complete([Message.user("Reply with the word OK.")], max_tokens=1)
    except EndpointError as e:
        status = f"HTTP {e.status}: " if e.status else ""
        if e.status in (401, 403):
            report.bad(f"the server refused the key ({status}{str(e).split(': ', 1)[-1]})")
        else:
            report.bad(f"one-token call failed ({status}{str(e).split(': ', 1)[-1]})")
        return
    u = response.usage
    usage = f"{u.input + u.cached_input} in, {u.output + u.reasoning} out" + (" (estimated)" if u.estimated else "")
    report.good(f"one-token call {time.perf_counter() - start:.2f} s, usage {usage}")


def _price(report: EndpointReport, config: EndpointConfig) -> EndpointReport:
    listed = known_price(config.model)
    if config.price is not None:
        note = f"price {per_million(config.price)}"
        if listed is not None and listed != config.price:
            note += f" (the list price is {per_million(listed)})"
        report.good(note)
    elif config.free:
        report.good("free (free: true)")
    else:
        hint = f"; the list price is {per_million(listed)}" if listed is not None else ""
        report.bad(f"no price (add price: {{input, cached_input, output}} or free: true{hint})")
    return report


async def check_all(endpoints: dict[str, EndpointConfig]) -> list[EndpointReport]:
    return list(await asyncio.gather(*(check_endpoint(n, c) for n, c in endpoints.items())))
