"""The serving core on tiny Step checkpoints: greedy fp32 outputs equal the plain path token for token,
whatever the arrival order, batch, chunk size, prefix hits or preemptions."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from advisor.engine import LLM
from advisor.engine.serving import AsyncLLM, EngineCore, SamplingParams, ServingConfig

from tests.engine.step_models import TEXT_A, TEXT_C, build_reference, save_reference

NEW = 10


@pytest.fixture(scope="module", params=["A", "C"])
def llm(request, tmp_path_factory):
    text = {"A": TEXT_A, "C": TEXT_C}[request.param]
    ref = build_reference(text, seed=5)
    return LLM.from_pretrained(save_reference(ref, tmp_path_factory.mktemp("serve") / "ckpt"))


def prompts(llm, n=6, shared=0, seed=0) -> list[list[int]]:
    """n prompts of 3-30 tokens, the first `shared` tokens common to all."""
    g = random.Random(seed)
    v = llm.config.text.vocab_size
    head = [g.randrange(1, v) for _ in range(shared)]
    return [head + [g.randrange(1, v) for _ in range(g.randrange(3, 30))] for _ in range(n)]


def plain(llm, ps, new=NEW) -> list[list[int]]:
    """The plain path: each prompt alone through the static cache (at parity with transformers)."""
    return [llm.generate_static([p], new, stop_token_ids=[])[0] for p in ps]


def core(llm, **kw) -> EngineCore:
    return EngineCore(llm, ServingConfig(**{"block_size": 4, "num_blocks": 256, **kw}))


def greedy(new=NEW) -> SamplingParams:
    return SamplingParams(max_tokens=new)


def staggered(c: EngineCore, ps, order, every=2, new=NEW) -> dict[int, list[int]]:
    """Submit the prompts in `order`, one more every `every` steps, driving the core in between."""
    seqs = {}
    pending = list(order)
    while pending or not all(s.finished for s in seqs.values()):
        if pending:
            i = pending.pop(0)
            seqs[i] = c.submit(ps[i], greedy(new))
        for _ in range(every):
            c.step()
    return {i: s.output for i, s in seqs.items()}


@pytest.mark.parametrize(("chunk", "block_size"), [(1, 2), (5, 4), (64, 16)])
def test_all_at_once_matches_the_plain_path(llm, chunk, block_size):
    ps = prompts(llm)
    want = plain(llm, ps)
    c = core(llm, max_num_batched_tokens=chunk, block_size=block_size)
    got = [s.output for s in c.generate(ps, [greedy()] * len(ps))]
    assert got == want


@pytest.mark.parametrize("seed", [0, 1])
def test_arrival_order_and_joining_mid_run_change_nothing(llm, seed):
    ps = prompts(llm, seed=seed)
    want = plain(llm, ps)
    order = list(range(len(ps)))
    random.Random(seed).shuffle(order)
    got = staggered(core(llm, max_num_batched_tokens=7), ps, order, every=3)
    assert [got[i] for i in range(len(ps))] == want


def test_prefix_hits_give_the_same_tokens_and_skip_the_shared_prefill(llm):
    ps = prompts(llm, n=4, shared=21, seed=3)
    want = plain(llm, ps)
    c = core(llm, max_num_batched_tokens=16)
    first = c.generate(ps[:1], [greedy()])[0]
    rest = c.generate(ps[1:], [greedy()] * 3)
    assert [first.output] + [s.output for s in rest] == want
    assert first.num_cached_prompt == 0
    assert [s.num_cached_prompt for s in rest] == [20, 20, 20]  # 21 shared tokens, in blocks of 4
    # a whole conversation re-sent with one more turn: everything computed before is a hit, in whole
    # blocks (the last token generated was never fed back, so its key was never computed)
    again = c.generate([ps[0] + first.output + [7, 8, 9]], [greedy()])[0]
    assert again.num_cached_prompt == (len(ps[0]) + NEW - 1) // 4 * 4
    assert again.output == plain(llm, [ps[0] + first.output + [7, 8, 9]])[0]


@pytest.mark.parametrize("use_cpu_op", [True, False])
def test_the_compiled_op_and_the_pytorch_path_give_the_plain_tokens(llm, use_cpu_op, monkeypatch):
    """The CPU runs the compiled paged-attention op where it is built, else the PyTorch gather + SDPA:
    both, with chunks beside decodes and prefix hits, give the plain path's tokens (and the op really ran)."""
    from advisor.engine.serving.paged_attention import PagedTypeMeta

    ran = []
    fused = PagedTypeMeta.fused

    def counting(self, *a):
        out = fused(self, *a)
        ran.append(out is not None)
        return out

    monkeypatch.setattr(PagedTypeMeta, "fused", counting)
    ps = prompts(llm, n=5, shared=9, seed=6)
    want = plain(llm, ps)
    c = core(llm, max_num_batched_tokens=11)
    c.cache.use_cpu_op = use_cpu_op
    got = [s.output for s in c.generate(ps[:2], [greedy()] * 2) + c.generate(ps[2:], [greedy()] * 3)]
    assert got == want
    assert ran and all(ran) == use_cpu_op and any(ran) == use_cpu_op


def test_a_pool_too_small_for_everyone_preempts_and_still_matches(llm):
    ps = prompts(llm, n=6, seed=4)
    want = plain(llm, ps, new=16)
    c = core(llm, num_blocks=14, block_size=4, max_num_batched_tokens=32)
    got = [s.output for s in c.generate(ps, [greedy(16)] * len(ps))]
    assert c.scheduler.num_preemptions > 0
    assert got == want
    assert c.blocks.pools["full_attention"].num_in_use == 0


def test_stop_tokens_and_max_tokens_are_per_request(llm):
    ps = prompts(llm, n=3, seed=6)
    free = plain(llm, ps, new=12)
    stop = free[0][3]
    c = core(llm)
    params = [
        SamplingParams(max_tokens=12, stop_token_ids=(stop,)),
        SamplingParams(max_tokens=5),
        SamplingParams(max_tokens=12),
    ]
    a, b, d = c.generate(ps, params)
    assert a.output == free[0][: free[0].index(stop) + 1] and a.finish_reason == "stop"
    assert b.output == free[1][:5] and b.finish_reason == "length"
    assert d.output == free[2]


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    ps = prompts(llm, n=3, seed=7)
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    alone = core(llm).generate([ps[1]], [params])[0].output
    together = core(llm, max_num_batched_tokens=5).generate(ps, [params] * 3)[1].output
    assert alone == together
    other = core(llm).generate([ps[1]], [SamplingParams(max_tokens=12, temperature=1.0, seed=12)])[0].output
    assert other != alone


def test_cancelling_frees_the_blocks_and_the_others_go_on(llm):
    ps = prompts(llm, n=3, seed=8)
    want = plain(llm, ps, new=12)
    c = core(llm)
    seqs = [c.submit(p, greedy(12)) for p in ps]
    for _ in range(3):
        c.step()
    c.abort(seqs[1])
    c.drive(lambda: all(s.finished for s in seqs))
    assert seqs[1].finish_reason == "abort" and len(seqs[1].output) < 12
    assert [seqs[0].output, seqs[2].output] == [want[0], want[2]]
    assert c.blocks.pools["full_attention"].num_in_use == 0


def test_bad_requests_fail_alone(llm):
    c = core(llm, num_blocks=4, block_size=4, max_model_len=None)
    with pytest.raises(ValueError, match="at least one token"):
        c.submit([], greedy())
    with pytest.raises(ValueError, match="token id out of range"):
        c.submit([1, 10_000], greedy())
    big = c.submit(list(range(1, 30)), greedy())  # 29 tokens never fit 4 blocks of 4
    ok = c.submit([1, 2, 3], greedy(4))
    c.drive(lambda: big.finished and ok.finished)
    assert big.finish_reason == "error" and "does not fit the KV pool" in big.error
    assert ok.output == plain(llm, [[1, 2, 3]], new=4)[0]
    limited = core(llm, max_model_len=12)
    with pytest.raises(ValueError, match="exceeds the context length 12"):
        limited.submit(list(range(1, 10)), greedy(4))


def test_async_llm_streams_concurrent_requests_and_cancels_on_exit(llm):
    ps = prompts(llm, n=3, seed=9)
    want = plain(llm, ps)
    c = core(llm)
    engine = AsyncLLM(c)

    async def collect(p, stop_after=None):
        out = []
        async for ev in engine.generate(p, greedy()):
            if ev.token is not None:
                out.append(ev.token)
            if stop_after is not None and len(out) >= stop_after:
                break
        return out

    async def main():
        return await asyncio.gather(collect(ps[0]), collect(ps[1], stop_after=2), collect(ps[2]))

    a, b, d = asyncio.run(main())
    assert a == want[0] and d == want[2] and b == want[1][:2]
    for _ in range(500):  # the abort lands at the background thread's next step
        if not c.has_work():
            break
        time.sleep(0.01)
    assert not c.has_work()
    assert c.blocks.pools["full_attention"].num_in_use == 0
