"""A training run's record, `train_log.json` beside its checkpoint: the config and log a run keeps, how
that record is read and written, the chain of earlier runs a continued or grown checkpoint came from, and
the command line that reproduces each run. `training.train`, `training.grow` and `training.card` all
build on it, so none of them needs another's internals.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.tasks import FAMILIES

LOG_NAME = "train_log.json"

HELD_OUT_SEED_OFFSET = 100_003  # held-out tasks come from a different stream than the training tasks


@dataclass
class TrainConfig:
    model: str = "step-nano"
    out: str = "models/step-nano"
    work: str = "build/training"
    tasks: int = 3000
    held_out: int = 60
    families: tuple[str, ...] = FAMILIES
    effort: str = "low"
    vocab_size: int = 2048
    # 1: every digit its own token; 3: runs of up to three digits, every group one token
    # (training.tokenizer). Measured so far, groups were copied worse: training/README.md.
    digit_group: int = 1
    epochs: float = 1.0
    batch_size: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_len: int = 2048
    seed: int = 0
    threads: int = 1
    device: str = "cpu"  # "cuda" on a lent GPU: same modules, experts through the PyTorch path
    max_minutes: float = 0.0  # 0: no wall-clock cap; else stop (and still save) after this long
    log_every: int = 10
    save_dtype: str = "float32"
    init: str = ""  # continue from this checkpoint (same tokenizer) instead of a fresh initialisation
    recovery_every: int = 4  # every 4th task is played as a recovery after a wrong answer
    redo_every: int = 0  # every r-th pair of recoveries comes from a miscopied program, and redoes the calls
    # Copy drills (training.drills): drill batches only for the first `drill_warmup` steps, their filler
    # growing from 16 tokens to `drill_max_filler`; afterwards one drill batch after every `drill_every`
    # batches of traces (0: none).
    drill_warmup: int = 300
    drill_every: int = 4
    drill_batch_tokens: int = 8192
    drill_max_filler: int = 1024


@dataclass
class TrainLog:
    config: dict
    params: int = 0
    data: dict = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    drill_steps: list[int] = field(default_factory=list)
    drill_loss: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    metrics: dict = field(default_factory=dict)
    earlier: list[dict] = field(default_factory=list)  # the runs this one continued (--init), oldest first


RUN_KEYS = ("params", "data", "steps", "loss", "drill_steps", "drill_loss", "wall_s")


def read_log(checkpoint: Path) -> dict | None:
    """The checkpoint's train_log.json as written, or None when it has none."""
    path = checkpoint / LOG_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def write_log(checkpoint: Path, log: TrainLog | dict[str, Any]) -> None:
    """(Re)write the checkpoint's train_log.json from a run's log (a TrainLog, or a grow step's dict)."""
    d = asdict(log) if isinstance(log, TrainLog) else log
    (checkpoint / LOG_NAME).write_text(json.dumps(d, indent=1) + "\n", encoding="utf-8")


def earlier_runs(checkpoint: Path) -> list[dict]:
    """The runs that trained `checkpoint`, oldest first, from its train_log.json: each run's config, step
    log and wall time, so a continued run's card can give every command and one loss curve."""
    d = read_log(checkpoint)
    if d is None:
        return []
    config = {k: v for k, v in d["config"].items() if k != "init_config"}
    if d.get("earlier"):
        before = d["earlier"]
    elif config.get("init"):  # logs from before `earlier` was kept: follow the --init path
        before = earlier_runs(Path(config["init"]))
    else:
        before = []
    return [*before, {"config": config, **{k: d.get(k) for k in RUN_KEYS}}]


def command_of(config: dict) -> str:
    """The `python -m training.train` command line for a run's recorded config (non-default options)."""
    d = asdict(TrainConfig())
    config = {
        "drill_warmup": 0,
        "drill_every": 0,
        "init": "",
        **config,
    }  # records from before drills ran none
    parts = ["python -m training.train"]
    for key, value in config.items():
        if key not in d or key in ("out", "work") or value == d[key]:
            continue
        if key == "families":
            if tuple(value) == tuple(d[key]):
                continue
            value = ",".join(value)
        parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


def grow_command(config: dict, index: int) -> str:
    """How a grow step is written in a card (its source is the checkpoint of the run before)."""
    return f"python -m training.grow <checkpoint of run {index}> --model {config['model']}"


def run_command(config: dict, index: int) -> str:
    """Run `index`'s command (0-based); a continued run's --init is the checkpoint of the run before."""
    if config.get("grow"):
        return grow_command(config, index)
    cmd = command_of({k: v for k, v in config.items() if k != "init"})
    return cmd + (f" --init <checkpoint of run {index}>" if index else "")
