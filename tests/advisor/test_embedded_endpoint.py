"""The embedded endpoint end to end on a tiny random Step3p7 checkpoint with our test tokenizer."""

from __future__ import annotations

import asyncio
import copy
import threading

import pytest
from advisor.engine.text.tokenizer import build_step_tokenizer, load_tokenizer
from advisor.tools.spec import tool

from advisor.endpoints import make_endpoint
from advisor.endpoints.base import EndpointConfig, EndpointError
from advisor.endpoints.embedded import EmbeddedEndpoint, Generation, resolve_model
from advisor.messages import ImagePart, Message
from tests.engine.step_models import TEXT_C, build_reference


@tool
def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: first number
        b: second number
    """
    return a + b


MESSAGES = [Message.system("You add numbers."), Message.user("What is 2 + 3?")]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("embedded_ckpt")
    tok = build_step_tokenizer(path, vocab_size=400)
    text = copy.deepcopy(TEXT_C)
    text["vocab_size"] = tok.vocab_size
    text["eos_token_id"] = tok.eos_token_id
    text["pad_token_id"] = tok.pad_token_id
    build_reference(text, seed=3).save_pretrained(path)
    return path


def _endpoint(ckpt, **extra) -> EmbeddedEndpoint:
    cfg = EndpointConfig(provider="embedded", model=str(ckpt), free=True, max_tokens=16, extra_body=extra)
    return make_endpoint("flash", cfg)


async def test_usage_counts_are_the_real_token_counts(ckpt):
    ep = _endpoint(ckpt)
    assert isinstance(ep, EmbeddedEndpoint)
    seen = []
    resp = await ep.complete(MESSAGES, tools=[add], effort="low", on_attempt=seen.append)

    # the same prompt, rendered and generated independently
    tok = load_tokenizer(ckpt)
    schema = [add.openai_schema()]
    wire = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"}]
    prompt = tok.apply_chat_template(wire, schema, effort="low")
    assert "Reasoning: low" in tok.decode(prompt) and "<tools>" in tok.decode(prompt)
    new = ep._engine.llm.generate([prompt], max_new_tokens=16, stop_token_ids=tok.eos_token_ids)[0]

    u = resp.usage
    assert u.input + u.cached_input == len(prompt)
    assert u.output + u.reasoning == len(new)
    think_close = tok.token_to_id("</think>")
    expected_reasoning = (
        new.index(think_close) + 1 if think_close in new else len(new) - (new[-1] == tok.eos_token_id)
    )
    assert u.reasoning == expected_reasoning
    assert resp.finish_reason in ("stop", "length", "tool_calls")
    assert resp.model == str(ckpt)
    assert len(resp.attempts) == 1 and resp.attempts[0].ok and resp.attempts[0].usage == u
    assert seen == resp.attempts
    # random weights: whatever came out was parsed, nothing was lost
    body = tok.decode(new[:-1] if new[-1] == tok.eos_token_id else new)
    assert (resp.message.reasoning or "") in body and resp.message.text in body


async def test_tool_calls_well_formed_and_malformed(ckpt, monkeypatch):
    ep = _endpoint(ckpt)
    await ep._get_engine()
    tok = ep._engine.tokenizer
    outputs = {
        "good": "adding</think>\n<tool_call>\n<function=add>\n<parameter=a>\n2\n</parameter>\n"
        "<parameter=b>\n3\n</parameter>\n</function>\n</tool_call>",
        "bad": "adding</think>\nSure.<tool_call>\n<function=add>\n<parameter=a>\n2",
        "none": "easy</think>\n5",
    }
    current = {}

    def scripted(prompt, max_new, *args):
        return Generation(tok.encode(current["text"]) + [tok.eos_token_id], 0)

    monkeypatch.setattr(ep._engine, "generate", scripted)

    current["text"] = outputs["good"]
    resp = await ep.complete(MESSAGES, tools=[add])
    (call,) = resp.message.tool_calls
    assert (call.name, call.arguments, call.parse_error) == ("add", {"a": 2, "b": 3}, None)
    assert resp.finish_reason == "tool_calls" and resp.message.reasoning == "adding"
    n = len(tok.encode(outputs["good"])) + 1
    assert resp.usage.reasoning == len(tok.encode("adding")) + 1  # up to and including </think>
    assert resp.usage.output + resp.usage.reasoning == n

    current["text"] = outputs["bad"]
    resp = await ep.complete(MESSAGES, tools=[add])
    (call,) = resp.message.tool_calls
    assert call.arguments is None and call.parse_error and call.name == "add"
    assert "<function=add>" in call.raw_arguments
    assert resp.message.text == "Sure."

    current["text"] = outputs["none"]
    resp = await ep.complete(MESSAGES, tools=[add])
    assert resp.message.tool_calls == [] and resp.message.text == "5" and resp.finish_reason == "stop"


async def test_concurrent_calls_join_one_running_batch_without_blocking_the_loop(ckpt):
    ep = _endpoint(ckpt)
    other = _endpoint(ckpt)  # a second endpoint on the same checkpoint reuses the loaded model and core
    ticks = 0
    done = False

    async def ticker():
        nonlocal ticks
        while not done:
            ticks += 1
            await asyncio.sleep(0.001)

    await ep._get_engine()
    core = ep._engine.llm.core
    calls = 12
    # the core takes no request until all twelve were submitted: a call that held a thread while it waited
    # (the default pool has cpu + 4 workers) would never let the twelfth through, and the gate would time
    # out; with it, how many share a step does not depend on how fast this machine is
    submitted, gate_opened = threading.Semaphore(0), []
    real_submit, real_take = core.submit, core._take_queued

    def counting_submit(*args, **kwargs):
        seq = real_submit(*args, **kwargs)
        submitted.release()
        return seq

    def gated_take():
        if not gate_opened:
            gate_opened.append(all(submitted.acquire(timeout=120) for _ in range(calls)))
        real_take()

    rows = []
    real_run = core.runner.run

    def counting_run(chunks):
        rows.append(len(chunks))
        return real_run(chunks)

    core.submit, core._take_queued, core.runner.run = counting_submit, gated_take, counting_run
    try:
        t = asyncio.create_task(ticker())
        results = await asyncio.gather(
            *(
                e.complete([Message.user(f"question {i}")], max_tokens=4)
                for i, e in enumerate([ep, other] * (calls // 2))
            )
        )
        done = True
        await t
    finally:
        core.submit, core._take_queued, core.runner.run = real_submit, real_take, real_run
    assert ticks > 5  # the event loop ran on while the engine worked
    assert ep._engine is other._engine
    assert all(r.attempts[0].ok and 0 < r.usage.output + r.usage.reasoning <= 4 for r in results)
    # all twelve were in flight at once, and ran together in the core's steps
    assert gate_opened == [True]
    assert max(rows) == calls
    assert core.blocks.pools["full_attention"].num_in_use == 0


async def test_a_loops_second_step_reads_the_first_ones_prefix_from_the_cache(ckpt):
    """The second call of a conversation re-sends the first call's prompt and reply: the tokens of that
    prefix already computed come back as cached_input (whole blocks of 16), the rest as input."""
    ep = _endpoint(ckpt, kv_blocks=512)
    first = await ep.complete(MESSAGES, tools=[add])
    assert first.usage.cached_input == 0
    tok = ep._engine.tokenizer
    wire = [{"role": "system", "content": "You add numbers."}, {"role": "user", "content": "What is 2 + 3?"}]
    p1 = tok.apply_chat_template(wire, [add.openai_schema()], effort=None)
    assert first.usage.input == len(p1)
    step2 = MESSAGES + [first.message, Message.user("Now add 4 and 5, please, and explain.")]
    second = await ep.complete(step2, tools=[add])
    from advisor.endpoints.openai import to_openai_messages

    p2 = tok.apply_chat_template(to_openai_messages(step2), [add.openai_schema()], effort=None)
    shared = 0
    while shared < min(len(p1), len(p2)) and p1[shared] == p2[shared]:
        shared += 1
    assert shared >= 16  # the system prompt and the tool schema at least
    assert second.usage.cached_input == shared // 16 * 16 > 0
    assert second.usage.input + second.usage.cached_input == len(p2)


async def test_errors_are_one_line_endpoint_errors(ckpt, tmp_path):
    seen = []
    missing = EndpointConfig(provider="embedded", model=str(tmp_path / "nope"), free=True)
    with pytest.raises(EndpointError, match="no checkpoint directory") as e:
        await EmbeddedEndpoint("flash", missing).complete(MESSAGES, on_attempt=seen.append)
    assert "\n" not in str(e.value) and len(e.value.attempts) == 1 and not seen[0].ok

    with pytest.raises(EndpointError, match="not embedded options"):
        _endpoint(ckpt, stream=True)


def test_shipped_model_names_resolve_under_the_models_dir(tmp_path, monkeypatch):
    (tmp_path / "step-tiny").mkdir()
    monkeypatch.setenv("ADVISOR_MODELS_DIR", str(tmp_path))
    assert resolve_model("step-tiny") == (tmp_path / "step-tiny").resolve()
    with pytest.raises(FileNotFoundError, match="ADVISOR_MODELS_DIR"):
        resolve_model("step-huge")
    # the repository's own models resolve by name with no set-up
    from advisor.endpoints.embedded import SHIPPED_MODELS

    assert resolve_model("step-nano") == (SHIPPED_MODELS / "step-nano").resolve()
    assert (SHIPPED_MODELS / "step-nano" / "config.json").is_file()


@pytest.fixture(scope="module")
def vision_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("embedded_vision_ckpt")
    tok = build_step_tokenizer(path, vocab_size=400)
    text = copy.deepcopy(TEXT_C)
    text.update(vocab_size=tok.vocab_size, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = build_reference(text, seed=5)
    model.config.image_token_id = tok.token_to_id("<im_patch>")
    model.save_pretrained(path)
    return path


async def test_images_reach_the_vision_tower(vision_ckpt):
    import io

    import numpy as np
    from advisor.engine.llm import LLM
    from advisor.engine.text.image_processing import ImageProcessorConfig, preprocess
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).resize((160, 90)).save(buf, "PNG")
    part = ImagePart(buf.getvalue(), "image/png", image_id="img_0")
    ep = _endpoint(vision_ckpt)
    resp = await ep.complete(
        [Message.system("Describe."), Message.user("What is in img_0?", [part])], effort="low"
    )

    # the prompt carries the image's full token layout, and the pixels changed what the model saw
    llm = LLM.from_pretrained(vision_ckpt)
    cfg = ImageProcessorConfig.from_vision_config(llm.config.vision)
    processed = preprocess([Image.open(io.BytesIO(part.data)).convert("RGB")], cfg)
    n_patch = processed.token_texts()[0].count("<im_patch>")
    assert n_patch == processed.num_image_tokens and processed.num_local_patches[0] >= 1
    text_only = await ep.complete(
        [Message.system("Describe."), Message.user("What is in img_0?")], effort="low"
    )
    ids = load_tokenizer(vision_ckpt).encode(processed.token_texts()[0])
    prompt_tokens = resp.usage.input + resp.usage.cached_input
    assert prompt_tokens == text_only.usage.input + text_only.usage.cached_input + len(
        ids
    )  # the whole layout
    with_img = llm.logits(
        ids,
        pixel_values=processed.pixel_values,
        pixel_values_local=processed.pixel_values_local,
        num_local_patches=processed.num_local_patches,
    )
    black = np.zeros_like(processed.pixel_values.numpy())
    import torch

    other = llm.logits(
        ids,
        pixel_values=torch.from_numpy(black),
        pixel_values_local=processed.pixel_values_local,
        num_local_patches=processed.num_local_patches,
    )
    assert not torch.allclose(with_img, other)


async def test_images_refused_when_the_image_token_ids_disagree(ckpt):
    # `ckpt`'s config image_token_id is not the tokenizer's <im_patch>: refused, naming both
    part = ImagePart(b"\x89PNG", "image/png")
    with pytest.raises(EndpointError, match="im_patch"):
        await _endpoint(ckpt).complete([Message.user("look", [part])])


async def test_identical_concurrent_calls_each_get_their_own_answer(ckpt):
    """Tasks that open the same way send the same prompt at once: each call is its own sequence (a
    value-equal job once stood in for another caller's and that caller came back with nothing)."""
    ep = _endpoint(ckpt)
    results = await asyncio.gather(*(ep.complete(MESSAGES, max_tokens=6) for _ in range(5)))
    assert len({(r.message.text, r.message.reasoning) for r in results}) == 1
    assert all(r.attempts[0].ok for r in results)


async def test_a_cancelled_call_leaves_the_batch_and_frees_its_blocks(ckpt):
    ep = _endpoint(ckpt, kv_blocks=256)
    await ep._get_engine()
    core = ep._engine.llm.core
    task = asyncio.create_task(ep.complete(MESSAGES, max_tokens=2000))
    for _ in range(500):  # until its sequence is running
        if core.scheduler.running:
            break
        await asyncio.sleep(0.01)
    assert core.scheduler.running
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if not core.has_work():
            break
        await asyncio.sleep(0.01)
    assert not core.has_work() and core.blocks.pools["full_attention"].num_in_use == 0


async def test_extra_body_turns_on_mtp_speculation(ckpt, tmp_path):
    import shutil

    from tests.engine.mtp_models import add_mtp_layers
    from training.mtp import with_mtp_config

    with pytest.raises(EndpointError, match="has no MTP layers") as e:
        await _endpoint(ckpt, speculative="mtp").complete(MESSAGES, tools=[add], effort="low")
    assert "\n" not in str(e.value)

    mtp = tmp_path / "with_mtp"
    shutil.copytree(ckpt, mtp)
    add_mtp_layers(with_mtp_config(ckpt, 2, mtp), seed=5)
    plain = await _endpoint(mtp).complete(MESSAGES, tools=[add], effort="low")
    ep = _endpoint(mtp, speculative="mtp", num_speculative_tokens=2)
    spec = await ep.complete(MESSAGES, tools=[add], effort="low")
    llm = ep._engine.llm
    assert llm.speculative == "mtp" and llm.speculative_tokens == 2
    assert llm.core.runner._drafter is not None  # the core drafted with the MTP layers
    assert spec.message == plain.message and spec.usage.output == plain.usage.output
