"""`advisor init`: a commented task.yaml and the endpoints beside it (advisor.yaml) for one provider preset.

Each preset names an executor and a frontier endpoint (`flash` and `frontier`, the names the shipped suites
use); prices come from the project's price data (`advisor/data/prices.yaml`), keys are environment
variable names. The files load as they are: `advisor run DIR/task.yaml` runs once the keys are exported
(the `embedded` preset needs none and runs offline).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

import yaml

from advisor.pricing import known_price


@dataclass(frozen=True)
class EndpointPreset:
    provider: str
    model: str
    base_url: str | None = None
    api_key_env: str | None = None
    extra: tuple[tuple[str, object], ...] = ()
    priced_as: str | None = None  # the known model whose price it takes (default: its own)

    def config(self) -> dict:
        cfg: dict = {"provider": self.provider, "model": self.model}
        if self.base_url:
            cfg["base_url"] = self.base_url
        if self.api_key_env:
            cfg["api_key_env"] = self.api_key_env
        cfg.update(dict(self.extra))
        price = known_price(self.priced_as or self.model)
        if price is not None:
            cfg["price"] = price.model_dump(exclude_none=True)
        return cfg


_ANTHROPIC = "https://api.anthropic.com"
_OPENROUTER = "https://openrouter.ai/api/v1"
_OPUS = EndpointPreset("anthropic", "claude-opus-4-5", _ANTHROPIC, "ANTHROPIC_API_KEY")
_SHIPPED = (("max_tokens", 256), ("vision", False))

# StepFun's global platform (platform.stepfun.ai, USD prices, global keys); accounts on the China platform
# (platform.stepfun.com) use the api.stepfun.com host with their own keys
STEPFUN_BASE_URL = "https://api.stepfun.ai/v1"

PRESETS: dict[str, tuple[str, EndpointPreset, EndpointPreset]] = {
    "stepfun": (
        "Step 3.7 Flash on StepFun's platform executes; Claude Opus 4.5 on Anthropic's API advises",
        EndpointPreset("openai", "step-3.7-flash", STEPFUN_BASE_URL, "STEPFUN_API_KEY"),
        _OPUS,
    ),
    "openrouter": (
        "both models through OpenRouter (one key); check the model ids on openrouter.ai/models",
        EndpointPreset("openai", "stepfun/step-3.7-flash", _OPENROUTER, "OPENROUTER_API_KEY"),
        EndpointPreset("openai", "anthropic/claude-opus-4.5", _OPENROUTER, "OPENROUTER_API_KEY"),
    ),
    "vllm": (
        "Step 3.7 Flash on your own vLLM or SGLang server (`vllm serve ... --port 8000`, no key), priced at "
        "StepFun's list price (set free: true to account it at zero); Claude Opus 4.5 advises",
        EndpointPreset("openai", "step-3.7-flash", "http://127.0.0.1:8000/v1"),
        _OPUS,
    ),
    "anthropic": (
        "both on Anthropic's API: Claude Haiku 4.5 executes, Claude Opus 4.5 advises",
        EndpointPreset("anthropic", "claude-haiku-4-5", _ANTHROPIC, "ANTHROPIC_API_KEY"),
        _OPUS,
    ),
    "embedded": (
        "the two small models shipped in models/, in-process, offline and without keys (tiny and narrow: "
        "they solve only the task families they were trained on); priced as Step 3.7 Flash and as a "
        "frontier model so the ledger shows what the pattern would cost",
        EndpointPreset("embedded", "step-nano", extra=_SHIPPED, priced_as="step-3.7-flash"),
        EndpointPreset(
            "embedded",
            "step-nano-large",
            extra=(*_SHIPPED, ("extra_body", {"dtype": "float32"})),
            priced_as="claude-opus-4-5",
        ),
    ),
}


def endpoints_yaml(preset: str) -> str:
    about, executor, frontier = PRESETS[preset]
    cfg = {"flash": executor.config(), "frontier": frontier.config()}
    keys = sorted({e.api_key_env for e in (executor, frontier) if e.api_key_env})
    head = (
        f"Endpoints for the tasks in this folder (`advisor init --preset {preset}`): {about}. Each name is "
        "one model; prices are USD per million tokens (advisor/data/prices.yaml). Keys are never written "
        "here: api_key_env names the environment variable that holds one"
        + (f" (export {', '.join(keys)})" if keys else "")
        + ". `advisor check advisor.yaml` tries each endpoint with a one-token call."
    )
    comment = "".join(f"# {line}\n" for line in textwrap.wrap(head, 100))
    return comment + yaml.safe_dump({"endpoints": cfg}, sort_keys=False, default_flow_style=None, width=200)


TASK_YAML = """\
# A task for `advisor run task.yaml` (every field: docs/task-yaml.md). Endpoints `flash` and `frontier`
# come from advisor.yaml beside this file.
name: first-task                 # also the output folder: runs/<run-id>/first-task/
goal: |
  Compute (395562 * 66347 - 50870917) % 838 + 63**3 exactly (use the python tool). Answer with the integer only.
tools: [python]                  # built-in tools: python, read_file, list_files, crop, zoom, find_regions, web_search, ...
# inputs: {files: [data.csv], images: [chart.png]}   # copied into the task's workspace / shown to the model
executor: {endpoint: flash, effort: low}            # the cheap model makes the tool calls
frontier: {endpoint: frontier, effort: {frontier_effort}}      # consulted only when the escalation says so
escalation:
  after_failures: 1              # consult after this many failed steps in a row (a rejected answer included)
  at: []                         # also at inflection points: plan, replan (after a rejected answer), final
  mode: restart                  # advise: guidance only; takeover: the frontier acts; restart: from the goal
  takeover_steps: 2              # steps the frontier takes in takeover / restart mode
  max_consults: 2
budget: {max_usd: 0.25, max_steps: 12, max_wall_s: 300}
check: {type: equals, value: "250338"}             # also: contains, regex, python (a function), command, none
"""


def task_yaml(preset: str) -> str:
    # the shipped small models were trained at low effort only; real frontier models do better at high
    return TASK_YAML.replace("{frontier_effort}", "low" if preset == "embedded" else "high")


def write(folder: Path, preset: str, force: bool = False) -> list[Path]:
    """Writes folder/task.yaml and folder/advisor.yaml; refuses to overwrite either without `force`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    files = {folder / "task.yaml": task_yaml(preset), folder / "advisor.yaml": endpoints_yaml(preset)}
    existing = [p for p in files if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]}: already exists (pass --force to overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
    return list(files)
