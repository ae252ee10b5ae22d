"""Generation behaviour: stop tokens, sampling with seeds, top-p, the KV cache's sliding ring."""

from __future__ import annotations

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.model.cache import KVCache
from advisor.engine.model.sampling import sample

from tests.engine.step_models import TEXT_A, build_reference, save_reference


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    ref = build_reference(TEXT_A, seed=3)
    return LLM.from_pretrained(save_reference(ref, tmp_path_factory.mktemp("gen") / "ckpt"))


PROMPTS = [[5, 17, 33, 2, 99], [7, 7, 120, 64, 3, 200, 11, 9, 40, 41, 42, 43], [250]]


def test_stop_tokens_end_each_row_independently(llm):
    free = llm.generate(PROMPTS, 16, stop_token_ids=[])
    stop = free[1][4]  # a token row 1 produces at step 5
    stopped = llm.generate(PROMPTS, 16, stop_token_ids=[stop])
    for row, full in zip(stopped, free, strict=True):
        cut = full.index(stop) + 1 if stop in full else len(full)
        assert row == full[:cut]
    assert stopped[1][-1] == stop and len(stopped[1]) <= 5


def test_default_stop_is_the_checkpoint_eos(llm):
    free = llm.generate([PROMPTS[0]], 10, stop_token_ids=[])[0]
    llm.config.text.eos_token_ids = [free[2]]
    try:
        assert llm.eos_token_ids == [free[2]]
        assert llm.generate([PROMPTS[0]], 10)[0] == free[: free.index(free[2]) + 1]
    finally:
        llm.config.text.eos_token_ids = []


def test_seeded_sampling_is_reproducible_and_varies_with_the_seed(llm):
    a = llm.generate(PROMPTS, 20, temperature=1.0, seed=1, stop_token_ids=[])
    b = llm.generate(PROMPTS, 20, temperature=1.0, seed=1, stop_token_ids=[])
    c = llm.generate(PROMPTS, 20, temperature=1.0, seed=2, stop_token_ids=[])
    assert a == b and a != c
    greedy = llm.generate(PROMPTS, 20, stop_token_ids=[])
    assert a != greedy
    # a nucleus smaller than any single token's mass leaves only the argmax
    assert llm.generate(PROMPTS, 20, temperature=1.0, top_p=1e-6, seed=5, stop_token_ids=[]) == greedy


def test_top_p_only_draws_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    drawn = sample(logits, temperature=1.0, top_p=0.7, generator=g)
    counts = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 already covers 0.7
    assert abs(counts[0] - 0.625) < 0.04  # renormalised 0.5 / 0.8
    assert sample(logits[:2], temperature=0.0).tolist() == [0, 0]


def test_sliding_layers_keep_only_their_window(llm):
    cfg = llm.config.text
    cache = KVCache(cfg, batch=2, max_len=50, dtype=torch.float32, device=torch.device("cpu"))
    for layer, k in zip(cfg.layers, cache.k, strict=True):
        assert k.shape[2] == (cfg.sliding_window if layer.attention == "sliding_attention" else 50)


def test_bad_prompts_are_clear_errors(llm):
    with pytest.raises(ValueError, match="at least one token"):
        llm.generate([[1, 2], []], 4)
    with pytest.raises(ValueError, match=r"token id out of range \[0, 256\)"):
        llm.generate([[1, 256]], 4)
    assert llm.generate([], 4) == []
    assert llm.generate([[1, 2]], 0) == [[]]


def test_chunked_prefill_through_the_cache_matches_one_pass(llm):
    """Chunks longer than the sliding window, shorter ones, and single tokens, all against one full pass."""
    cfg = llm.config.text
    ids = torch.randint(1, cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(0))
    want = llm.logits(ids)
    cache = KVCache(cfg, batch=2, max_len=30, dtype=torch.float32, device=torch.device("cpu"))
    got, start = [], 0
    with torch.inference_mode():
        for n in (9, 1, 4, 1, 1, 13, 1):  # 9 and 13 exceed the window of 6
            chunk = ids[:, start : start + n]
            pos = torch.arange(start, start + n).expand(2, -1)
            got.append(llm.model(llm.model.embed_tokens(chunk), cache.plan(pos), cache).float())
            start += n
    assert start == 30
    torch.testing.assert_close(torch.cat(got, dim=1), want, rtol=1e-4, atol=1e-4)


def test_stream_yields_what_generate_returns(llm):
    want = llm.generate([PROMPTS[1]], 12, temperature=0.7, seed=4)[0]
    assert list(llm.stream(PROMPTS[1], 12, temperature=0.7, seed=4)) == want
    free = llm.generate([PROMPTS[0]], 8, stop_token_ids=[])[0]
    assert list(llm.stream(PROMPTS[0], 8, stop_token_ids=[free[3]])) == free[: free.index(free[3]) + 1]


@pytest.mark.parametrize(("prompt", "new"), [([9], 3), ([9, 10], 2), ([4, 5, 6, 7, 8, 9, 10, 11], 1)])
def test_short_runs_where_the_cache_is_smaller_than_the_window(llm, prompt, new):
    assert llm.generate([prompt], new, stop_token_ids=[]) == llm.generate(
        [prompt], new, stop_token_ids=[], use_cache=False
    )
