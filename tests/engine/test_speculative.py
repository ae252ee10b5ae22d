"""MTP speculative decoding: greedy identity with plain decoding at batch 1 and 16 (rows accepting
different numbers of drafts), rejection sampling's distribution, options and errors."""

from __future__ import annotations

import random

import pytest
import torch

from engine import LLM
from engine.model.speculative import SpeculativeDecoder, accept_sampled
from tests.engine.mtp_models import mtp_checkpoint
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
    plain = llm.generate(PROMPTS, 24, stop_token_ids=[])
    spec = llm.generate(PROMPTS, 24, stop_token_ids=[], speculative="mtp", num_speculative_tokens=k)
    assert spec == plain


def _oracle(monkeypatch, plain: list[list[int]], prompts, seed: int):
    """Drafts from the true greedy continuation, each wrong from a random index on: rows accept every count
    from 0 to k (the MTP layers of a random checkpoint rarely agree with the model at all)."""
    rng = random.Random(seed)
    counts: list[int] = []
    real_step = SpeculativeDecoder.step

    def propose(self, new_hidden):
        B, k = len(self.seqs), self.k
        d = torch.zeros(B, k, dtype=torch.long)
        for b in range(B):
            done = len(self.seqs[b]) - len(prompts[b])
            cont = (plain[b] + [0] * 3 * (k + 1))[done : done + k]
            wrong = rng.randint(0, k)
            d[b] = torch.tensor([t if i < wrong else (t + 1) % 48 for i, t in enumerate(cont)])
        self.drafts, self.draft_logits = d, torch.zeros(B, k, 48)

    def step(self):
        before = self.accepted
        out = real_step(self)
        counts.append(self.accepted - before)
        return out

    monkeypatch.setattr(SpeculativeDecoder, "_propose", propose)
    monkeypatch.setattr(SpeculativeDecoder, "step", step)
    return counts


@pytest.mark.parametrize("batch", [1, 16])
def test_rows_accepting_different_counts_keep_plain_greedy_output(llm, monkeypatch, batch):
    torch.manual_seed(batch)
    prompts = [torch.randint(1, 48, (int(n),)).tolist() for n in torch.randint(1, 20, (batch,))]
    plain = llm.generate(prompts, 30, stop_token_ids=[])
    per_row = []
    real_step = SpeculativeDecoder.step

    def tracking(self):
        before = [len(s) for s in self.seqs]
        out = real_step(self)
        per_row.append([len(s) - n for s, n in zip(self.seqs, before, strict=True)])
        return out

    _oracle(monkeypatch, plain, prompts, seed=batch)
    monkeypatch.setattr(SpeculativeDecoder, "step", tracking)
    spec = llm.generate(prompts, 30, stop_token_ids=[], speculative="mtp", num_speculative_tokens=3)
    assert spec == plain
    seen = {n for step in per_row for n in step if n}
    assert seen == {1, 2, 3, 4}  # 0..3 drafts accepted, plus the model's own token
    if batch > 1:
        assert any(len(set(step)) > 2 for step in per_row)  # rows advancing by different counts at once


def test_stream_stops_and_max_new_with_speculation(llm, monkeypatch):
    plain = llm.generate(PROMPTS, 20, stop_token_ids=[])
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
    assert LLM.from_pretrained(plain_ckpt).speculative is None  # off unless asked
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


def test_rejection_sampling_draws_from_the_model_distribution(llm):
    """2000 samples of tokens 2-4 (all past the first verify step) with speculation against 2000 plain
    ones: the chi-squared test of homogeneity must not reject them."""
    prompt = [5, 17, 33, 2, 9]
    n, bs = 2000, 500
    kw = dict(temperature=1.0, top_p=0.9, stop_token_ids=[], max_batch_size=bs)
    # static batches: one generator for the batch (the serving core seeds every prompt alike)
    plain = llm.generate_static([prompt] * n, 4, seed=11, **kw)
    spec = llm.generate([prompt] * n, 4, seed=12, speculative="mtp", num_speculative_tokens=3, **kw)
    s = llm.last_speculation
    rate = s.accepted / s.row_steps
    assert 0.2 < rate < 2.5, rate  # drafts are accepted and rejected: both paths are exercised
    V = llm.config.text.vocab_size
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
