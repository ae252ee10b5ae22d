"""MTP speculative decoding: greedy identity with plain decoding at batch 1 and 16 (rows accepting
different numbers of drafts), rejection sampling's distribution, options and errors."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.model.cache import uncached_meta
from advisor.engine.model.mtp import head_logits, mtp_streams
from advisor.engine.model.speculative import accept_sampled
from advisor.engine.serving import EngineCore, SamplingParams, ServingConfig
from advisor.engine.serving.model_runner import ModelRunner
from advisor.engine.serving.speculation import PagedDrafter

from tests.engine.mtp_models import TEXT_MTP, add_mtp_layers, mtp_checkpoint
from tests.engine.step_models import TEXT_B, build_reference, save_reference


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM.from_pretrained(mtp_checkpoint(tmp_path_factory.mktemp("mtp") / "ckpt", seed=4))


PROMPTS = [
    [5, 17, 33, 2, 9, 11, 12, 13, 14, 15, 16],
    [7, 8],
    [3],
    [40, 41, 42, 43, 44, 45, 46, 47, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_speculation_is_plain_decoding(llm, k):
    plain = llm.generate_static(PROMPTS, 24, stop_token_ids=[])
    assert llm.generate(PROMPTS, 24, stop_token_ids=[]) == plain
    spec = llm.generate(PROMPTS, 24, stop_token_ids=[], speculative="mtp", num_speculative_tokens=k)
    assert spec == plain
    static = llm.generate_static(PROMPTS, 24, stop_token_ids=[], speculative="mtp", num_speculative_tokens=k)
    assert static == plain


def _oracle(monkeypatch, plain: list[list[int]], prompts, seed: int) -> list[list[int]]:
    """Drafts from the true greedy continuation, each wrong from a random index on: rows accept every count
    from 0 to k (the MTP layers of a random checkpoint rarely agree with the model at all). The real
    drafter still runs first (its state goes on as ever). Returns each step's tokens added per verify."""
    rng = random.Random(seed)
    want = {tuple(p): w for p, w in zip(prompts, plain, strict=True)}
    real_draft = PagedDrafter.draft
    real_run = ModelRunner.run
    steps: list[list[int]] = []

    def draft(self, seqs, max_model_len=None):
        real_draft(self, seqs, max_model_len)
        for s in seqs:
            n = len(s.spec.drafts)
            cont = (want[tuple(s.prompt)] + [0] * 8)[len(s.output) : len(s.output) + n]
            wrong = rng.randint(0, n)
            s.spec.drafts = [t if i < wrong else (t + 1) % 48 for i, t in enumerate(cont)]

    def run(self, chunks):
        out = real_run(self, chunks)
        steps.append([len(out[c.seq.id]) for c in chunks if c.drafts])
        return out

    monkeypatch.setattr(PagedDrafter, "draft", draft)
    monkeypatch.setattr(ModelRunner, "run", run)
    return steps


def _random_prompts(batch: int) -> list[list[int]]:
    torch.manual_seed(batch)
    return [torch.randint(1, 48, (int(n),)).tolist() for n in torch.randint(1, 20, (batch,))]


@pytest.mark.parametrize("batch", [1, 16])
def test_rows_accepting_different_counts_keep_plain_greedy_output(llm, monkeypatch, batch):
    prompts = _random_prompts(batch)
    plain = llm.generate_static(prompts, 30, stop_token_ids=[])
    steps = _oracle(monkeypatch, plain, prompts, seed=batch)
    spec = llm.generate(prompts, 30, stop_token_ids=[], speculative="mtp", num_speculative_tokens=3)
    assert spec == plain
    seen = {n for step in steps for n in step}
    assert seen == {1, 2, 3, 4}  # 0..3 drafts accepted, plus the model's own token
    if batch > 1:
        assert any(len(set(step)) > 2 for step in steps)  # rows advancing by different counts at once
    s = llm.last_speculation
    assert s.accepted == sum(n - 1 for step in steps for n in step)
    assert llm.core.blocks.pools["full_attention"].num_in_use == 0


@pytest.fixture(scope="module")
def dense_llm(tmp_path_factory):
    """MTP layers as the release's and `training.mtp`'s (sliding attention, a dense MLP), which the chained
    `mtp_draft` op runs."""
    from training.mtp import with_mtp_config

    path = tmp_path_factory.mktemp("mtp_dense") / "plain"
    text = copy.deepcopy(TEXT_MTP)
    n = text["num_hidden_layers"]
    text["num_nextn_predict_layers"] = 0
    per_layer = ("layer_types", "rope_theta", "partial_rotary_factors", "swiglu_limits", "swiglu_limits_shared")
    for key in per_layer:
        text[key] = text[key][:n]
    save_reference(build_reference(text, seed=6), path)
    mtp = with_mtp_config(path, 3, path.parent / "mtp")
    for f in path.iterdir():
        if f.name != "config.json":
            (mtp / f.name).write_bytes(f.read_bytes())
    return LLM.from_pretrained(add_mtp_layers(mtp, seed=7))


@pytest.mark.parametrize("batch", [1, 16])
def test_chained_drafting_is_the_layer_loop(dense_llm, monkeypatch, batch):
    """A greedy round through `mtp_draft` (every layer in one call) leaves each sequence the drafts, firm
    ends and carried rows that the layer-by-layer loop computes from the same state, while rows accept
    every count from 0 to k; outputs stay plain decoding's."""
    llm = dense_llm
    assert all(type(layer.block.mlp).__name__ == "MLP" for layer in llm.model.mtp)
    prompts = _random_prompts(batch)
    plain = llm.generate_static(prompts, 30, stop_token_ids=[])
    real, loop = PagedDrafter._draft_chained, PagedDrafter.draft  # the drafter's own, before the oracle's
    rounds: list[list[int]] = []

    def chained(self, todo):
        before = [(s.spec.firm[:], list(s.spec.carry)) for s, _ in todo]
        if not real(self, todo):
            return False
        rounds.append([cap for _, cap in todo])
        got = [(s.spec.drafts, s.spec.firm[:], list(s.spec.carry)) for s, _ in todo]
        for (s, _), (firm, carry) in zip(todo, before, strict=True):
            s.spec.firm[:], s.spec.carry[:] = firm, carry
        monkeypatch.setattr(PagedDrafter, "_draft_chained", lambda self, todo: False)
        try:
            loop(self, [s for s, _ in todo])
        finally:
            monkeypatch.setattr(PagedDrafter, "_draft_chained", chained)
        for (s, _), (drafts, firm, carry) in zip(todo, got, strict=True):
            assert (s.spec.drafts, s.spec.firm) == (drafts, firm)
            for a, b in zip(s.spec.carry, carry, strict=True):
                assert (a is None and b is None) or torch.equal(a, b)
        return True

    monkeypatch.setattr(PagedDrafter, "_draft_chained", chained)
    steps = _oracle(monkeypatch, plain, prompts, seed=batch)
    spec = llm.generate(prompts, 30, stop_token_ids=[], speculative="mtp", num_speculative_tokens=3)
    assert spec == plain
    assert {n for step in steps for n in step} == {1, 2, 3, 4}
    assert len(rounds) > 5 and {3, 2} <= {c for r in rounds for c in r}  # caps shrink near max_tokens
    if batch > 1:
        assert max(len(r) for r in rounds) > 8


def _definition_drafts(llm, tokens: list[int], k: int) -> list[int]:
    """Greedy drafts from the MTP definition over the whole sequence (no cache): h^0 of x_0..x_{m-1},
    layer j at position m - 1 reading x_m and the drafts before it."""
    model = llm.model
    m = len(tokens) - 1
    ids = torch.tensor([tokens[:m]])
    positions = torch.arange(m)[None]
    with torch.inference_mode():
        _, hidden = model(model.embed_tokens(ids), uncached_meta(llm.config.text, positions), hidden=True)
        drafts: list[int] = []
        for j in range(1, k + 1):
            ext = torch.tensor([tokens + drafts])
            streams = mtp_streams(model, hidden, ext, j)
            logits = head_logits(model.mtp[j - 1], streams[j - 1][:, m - 1])
            drafts.append(int(logits.argmax()))
    return drafts


def test_paged_drafts_are_the_definition_through_preemption_and_prefix_hits(llm, monkeypatch):
    """Every draft the core makes (the MTP layers' paged KV kept, carried, overwritten, dropped with a
    preempted sequence, served by the prefix cache) is the definition's, while outputs stay plain."""
    prompts = _random_prompts(6)
    shared = [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13]
    prompts = [shared + p for p in prompts[:3]] + prompts[3:]
    plain = llm.generate_static(prompts, 16, stop_token_ids=[])
    real_draft = PagedDrafter.draft
    seen: list[tuple[list[int], list[int]]] = []

    def draft(self, seqs, max_model_len=None):
        real_draft(self, seqs, max_model_len)
        seen.extend((s.tokens, list(s.spec.drafts)) for s in seqs)

    monkeypatch.setattr(PagedDrafter, "draft", draft)
    c = EngineCore(llm, ServingConfig(block_size=4, num_blocks=18, max_num_batched_tokens=24))
    params = SamplingParams(16, num_speculative_tokens=3)
    got = [s.output for s in c.generate(prompts, [params] * len(prompts))]
    assert got == plain
    assert c.scheduler.num_preemptions > 0
    for pool in c.blocks.pools.values():
        assert pool.num_in_use == 0
    # prefix hits: the cached blocks bring their MTP entries; a block's key also covers the 3 tokens
    # after it (its MTP entries read them), so a prompt diverging at 12 hits blocks 0-1 only
    c = EngineCore(llm, ServingConfig(block_size=4, num_blocks=256))
    first = c.generate([prompts[0]], [params])[0]
    other = c.generate([prompts[1]], [params])[0]
    again = c.generate([prompts[0] + first.output[:5]], [params])[0]
    assert (other.num_cached_prompt, other.output) == (8, plain[1])
    assert again.num_cached_prompt == (len(prompts[0]) + 5 - 1 - 3) // 4 * 4
    assert again.output == llm.generate_static([prompts[0] + first.output[:5]], 16, stop_token_ids=[])[0]
    assert len(seen) > 20
    for tokens, drafts in seen[::3] + seen[-8:]:
        assert drafts == _definition_drafts(llm, tokens, len(drafts))[: len(drafts)]


def test_compiled_mtp_rounds_are_the_module_path(llm, monkeypatch):
    """Each drafting round through the compiled `mtp_layer` op gives the stream and logits of the layer's
    modules on the PyTorch attention path (same inputs, same cache), and the argmax of its logits; the
    long first round over a prompt runs the modules; greedy output stays plain decoding's."""
    real = PagedDrafter._layer
    fused: list[int] = []
    modules: list[int] = []

    def layer(self, j, ids, hid, chunks, ends):
        stream, logits, picks = real(self, j, ids, hid, chunks, ends)
        if picks is None:
            modules.append(len(ids))
            return stream, logits, picks
        fused.append(len(chunks))
        self.cache.use_cpu_op = False
        try:
            ref_stream, ref_logits, ref_picks = real(self, j, ids, hid, chunks, ends)
        finally:
            self.cache.use_cpu_op = True
        assert ref_picks is None
        torch.testing.assert_close(stream, ref_stream, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert picks == logits.argmax(-1).tolist()
        return stream, logits, picks

    monkeypatch.setattr(PagedDrafter, "_layer", layer)
    prompts = _random_prompts(5) + [list(range(1, 48)) * 4]  # 188 tokens: past the op's 128 rows
    plain = llm.generate_static(prompts, 20, stop_token_ids=[])
    assert llm.generate(prompts, 20, stop_token_ids=[], speculative="mtp", num_speculative_tokens=3) == plain
    assert max(fused) > 1 and len(fused) > 20  # several sequences in one call, every later round
    assert max(modules) > 128


def test_rejected_drafts_blocks_go_back_and_only_accepted_tokens_are_cached(llm, monkeypatch):
    prompts = [[5, 17, 33, 2, 9, 11, 12]]
    plain = llm.generate_static(prompts, 40, stop_token_ids=[])
    _oracle(monkeypatch, plain, prompts, seed=3)
    c = EngineCore(llm, ServingConfig(block_size=2, num_blocks=64))
    seq = c.submit(prompts[0], SamplingParams(40, num_speculative_tokens=3))
    pool = c.blocks.pools["full_attention"]
    while not seq.finished:
        c.step()
        if seq.finished:
            break
        # the table covers the computed positions only: the drafts' slots went back
        assert len(seq.tables["full_attention"]) == -(-seq.num_computed // 2)
        assert pool.num_in_use == len(seq.tables["full_attention"])
        # cached blocks hold accepted tokens only, and only those whose MTP entries are firm
        assert seq.registered * 2 <= seq.num_computed - 3 + 1
    assert seq.output == plain[0]
    # all but the last few blocks stay cached (a block waits for its 3 firm tokens after it)
    assert pool.num_in_use == 0 and 15 <= pool.num_cached() <= (len(prompts[0]) + 40 - 1 - 3 + 1) // 2


def test_stream_stops_and_max_new_with_speculation(llm, monkeypatch):
    plain = llm.generate_static(PROMPTS, 20, stop_token_ids=[])
    _oracle(monkeypatch, plain, PROMPTS, seed=7)
    assert list(llm.stream(PROMPTS[0], 20, stop_token_ids=[], speculative="mtp")) == plain[0]
    stop = plain[1][6]
    want = [row[: row.index(stop) + 1] if stop in row else row for row in plain]
    assert llm.generate(PROMPTS, 20, stop_token_ids=[stop], speculative="mtp") == want
    assert llm.generate(PROMPTS, 5, stop_token_ids=[], speculative="mtp") == [row[:5] for row in plain]
    assert llm.generate(PROMPTS, 1, stop_token_ids=[], speculative="mtp") == [row[:1] for row in plain]


def test_options_and_one_line_errors(llm, tmp_path):
    plain_ckpt = save_reference(build_reference(TEXT_B, seed=0), tmp_path / "plain")
    with pytest.raises(ValueError, match="has no MTP layers") as e:
        LLM.from_pretrained(plain_ckpt, speculative="mtp")
    assert "\n" not in str(e.value) and str(plain_ckpt) in str(e.value)
    plain_llm = LLM.from_pretrained(plain_ckpt)
    assert plain_llm.speculative is None and plain_llm.speculative_tokens == 0  # off unless asked
    with pytest.raises(ValueError, match="has no MTP layers") as e:  # a request asking the core for it
        plain_llm.core.submit([1, 2], SamplingParams(4, num_speculative_tokens=2))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="between 1 and the checkpoint's 3"):
        llm.core.submit([1, 2], SamplingParams(4, num_speculative_tokens=4))
    with pytest.raises(ValueError, match="between 1 and the checkpoint's 3"):
        llm.generate(PROMPTS, 4, speculative="mtp", num_speculative_tokens=4)
    with pytest.raises(ValueError, match="unknown method"):
        llm.generate(PROMPTS, 4, speculative="eagle")
    on = LLM(
        llm.config, llm.model, device=llm.device, dtype=llm.dtype, speculative="mtp", num_speculative_tokens=2
    )
    assert on.generate(PROMPTS, 12, stop_token_ids=[]) == llm.generate(PROMPTS, 12, stop_token_ids=[])
    assert on.last_speculation.k == 2
    # per call, "off" overrides the LLM's own setting
    on.last_speculation = None
    on.generate(PROMPTS, 4, stop_token_ids=[], speculative="off")
    assert on.last_speculation is None


def _chi2_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample chi-squared test of homogeneity on count vectors; the p-value."""
    keep = (a + b) > 0
    a, b = a[keep].double(), b[keep].double()
    n_a, n_b = a.sum(), b.sum()
    tot = a + b
    ea, eb = tot * n_a / (n_a + n_b), tot * n_b / (n_a + n_b)
    stat = ((a - ea) ** 2 / ea + (b - eb) ** 2 / eb).sum()
    df = keep.sum() - 1
    return float(torch.special.gammaincc(df / 2.0, stat / 2.0))


def _chi2_same(plain: list[list[int]], spec: list[list[int]], V: int) -> None:
    for i in (1, 2, 3):
        a = torch.bincount(torch.tensor([r[i] for r in plain]), minlength=V)
        b = torch.bincount(torch.tensor([r[i] for r in spec]), minlength=V)
        assert _chi2_p(a, b) > 1e-3, (i, _chi2_p(a, b))
    # and the joint of tokens 1 and 2 (the first verify step's accept or residual draw conditions both)
    ja = torch.bincount(torch.tensor([r[1] * V + r[2] for r in plain]), minlength=V * V)
    jb = torch.bincount(torch.tensor([r[1] * V + r[2] for r in spec]), minlength=V * V)
    big = (ja + jb) >= 20
    assert (
        _chi2_p(torch.cat([ja[big], ja[~big].sum()[None]]), torch.cat([jb[big], jb[~big].sum()[None]])) > 1e-3
    )


def test_rejection_sampling_in_the_core_draws_from_the_model_distribution(llm):
    """2000 samples of tokens 2-4 (all past the first verify step) with speculation in the serving core
    against 2000 plain ones, every request with its own seed: the chi-squared test must not reject them."""
    prompt = [5, 17, 33, 2, 9]
    n = 2000
    c = EngineCore(llm, ServingConfig(max_num_seqs=500, max_num_batched_tokens=4000, num_blocks=1024))

    def run(k: int, seed0: int) -> list[list[int]]:
        ps = [SamplingParams(4, 1.0, 0.9, seed0 + i, (), k) for i in range(n)]
        return [s.output for s in c.generate([prompt] * n, ps)]

    plain = run(0, 0)
    spec_seqs = c.generate([prompt] * n, [SamplingParams(4, 1.0, 0.9, 10_000 + i, (), 3) for i in range(n)])
    spec = [s.output for s in spec_seqs]
    rate = sum(s.spec.accepted for s in spec_seqs) / sum(s.spec.steps for s in spec_seqs)
    assert 0.2 < rate < 2.5, rate  # drafts are accepted and rejected: both paths are exercised
    _chi2_same(plain, spec, llm.config.text.vocab_size)


def test_rejection_sampling_on_static_batches_draws_from_the_model_distribution(llm):
    """The same on the static path (`generate_static`, one generator for the batch)."""
    prompt = [5, 17, 33, 2, 9]
    n, bs = 2000, 500
    kw = dict(temperature=1.0, top_p=0.9, stop_token_ids=[], max_batch_size=bs)
    plain = llm.generate_static([prompt] * n, 4, seed=11, **kw)
    spec = llm.generate_static([prompt] * n, 4, seed=12, speculative="mtp", num_speculative_tokens=3, **kw)
    s = llm.last_speculation
    assert 0.2 < s.accepted / s.row_steps < 2.5
    _chi2_same(plain, spec, llm.config.text.vocab_size)


def test_accept_sampled_matches_target_exactly_in_expectation():
    """The accept rule alone, for one draft: P(token) = p exactly (enumerated, not sampled)."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.2, 0.6])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    n = 20000
    drafts = torch.multinomial(q, n, replacement=True, generator=g)
    for start in range(0, n, 1000):
        d = drafts[start : start + 1000]
        B = d.shape[0]
        acc, nxt = accept_sampled(d[:, None], q.expand(B, 1, 3), p.expand(B, 2, 3), g)
        for a, t, dd in zip(acc, nxt, d.tolist(), strict=True):
            counts[dd if a else t] += 1
    assert torch.allclose(counts / n, p, atol=0.015)
