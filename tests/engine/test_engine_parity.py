"""The engine against transformers' Step3p7ForConditionalGeneration on tiny random checkpoints (fp32)."""

from __future__ import annotations

import pytest
import torch
from advisor.engine import LLM

from tests.engine.step_models import TEXT_A, TEXT_B, TEXT_C, build_reference, rel_err, save_reference

CONFIGS = {"A_sliding_mixed_heads_clamps": TEXT_A, "B_full_only_top1": TEXT_B, "C_mostly_sliding_mha": TEXT_C}


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    ref = build_reference(CONFIGS[request.param], seed=len(request.param))
    path = save_reference(ref, tmp_path_factory.mktemp(request.param) / "ckpt")
    return ref, LLM.from_pretrained(path)


def _prompt(vocab: int, n: int, seed: int) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_logits_match_reference(pair):
    ref, llm = pair
    vocab = llm.config.text.vocab_size
    ids = torch.tensor([_prompt(vocab, 23, 1), _prompt(vocab, 23, 2)])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    got = llm.logits(ids)
    assert got.dtype == torch.float32 and got.shape == (2, 23, vocab)
    assert rel_err(got, want) < 1e-4
    one = llm.logits(ids[0].tolist())  # 1-D input -> [T, vocab]
    assert one.shape == (23, vocab)
    assert rel_err(one, want[0]) < 1e-4


def test_greedy_32_tokens_match_reference_with_and_without_cache(pair):
    ref, llm = pair
    prompt = _prompt(llm.config.text.vocab_size, 9, 3)  # 9 + 32 tokens run far past every sliding window
    cached = llm.generate([prompt], 32, stop_token_ids=[])[0]
    uncached = llm.generate([prompt], 32, stop_token_ids=[], use_cache=False)[0]
    with torch.no_grad():
        want = ref.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    assert len(cached) == 32
    assert cached == uncached == want


def test_batched_left_padding_matches_single_prompts(pair):
    _, llm = pair
    vocab = llm.config.text.vocab_size
    prompts = [_prompt(vocab, n, 10 + n) for n in (3, 11, 7)]
    batched = llm.generate(prompts, 12, stop_token_ids=[])
    single = [llm.generate([p], 12, stop_token_ids=[])[0] for p in prompts]
    assert batched == single
    # the same through batches of two (a partial last batch)
    assert llm.generate(prompts, 12, stop_token_ids=[], max_batch_size=2) == single
