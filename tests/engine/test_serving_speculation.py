"""`advisor serve --speculative mtp`: the real server speculating with the MTP layers answers what the
plain one does (greedy), through the official `openai` SDK; a checkpoint without MTP layers is one line."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from advisor.engine.serving.server import load_served, running  # noqa: E402
from advisor.engine.text.tokenizer import build_step_tokenizer  # noqa: E402

from tests.engine.mtp_models import add_mtp_layers  # noqa: E402
from tests.engine.step_models import TEXT_C, build_reference  # noqa: E402

MESSAGES = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from training.mtp import with_mtp_config

    path = tmp_path_factory.mktemp("spec_serve") / "plain"
    tok = build_step_tokenizer(path, vocab_size=400)
    text = copy.deepcopy(TEXT_C)
    text.update(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    build_reference(text, seed=3).save_pretrained(path)
    mtp = path.parent / "mtp"
    shutil.copytree(path, mtp)
    add_mtp_layers(with_mtp_config(path, 2, mtp), seed=5)
    return path, mtp


def _complete(base: str, stream: bool) -> tuple[str, int]:
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    kw = dict(model="m", messages=MESSAGES, max_tokens=24, temperature=0)
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content or "", r.usage.completion_tokens
    text, n = "", 0
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return text, n


def test_serve_speculative_mtp_answers_as_plain(ckpts):
    _, mtp = ckpts
    answers = {}
    for mode in ("off", "mtp"):
        served = load_served(str(mtp), kv_blocks=128, max_model_len=1024, name="m", speculative=mode)
        with running(served) as base:
            answers[mode] = [_complete(base, False), _complete(base, True)]
        if mode == "mtp":
            assert served.llm.speculative_tokens == 2
            assert served.llm.core.runner._drafter is not None  # drafts ran in the core
    assert answers["mtp"] == answers["off"]
    assert answers["off"][0][1] > 0


def test_serve_speculative_on_a_checkpoint_without_mtp_layers_is_one_line(ckpts):
    plain, _ = ckpts
    r = subprocess.run(
        [sys.executable, "-m", "advisor.cli", "serve", str(plain), "--speculative", "mtp"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "has no MTP layers" in err and "\n" not in err, err
