"""The MTP layers' drafter (`advisor.engine.model.mtp`) against the definition written out, as rows advance unevenly."""

from __future__ import annotations

import random

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.model.cache import uncached_meta
from advisor.engine.model.layers import rope_tables
from advisor.engine.model.mtp import MTPDrafter, mtp_config, mtp_logits

from tests.engine.mtp_models import mtp_checkpoint


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM.from_pretrained(mtp_checkpoint(tmp_path_factory.mktemp("mtp") / "ckpt", seed=4))


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1 + w)


def _main_hidden(llm: LLM, ids: list[int]) -> torch.Tensor:
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    _, h = llm.model(llm.model.embed_tokens(x), uncached_meta(llm.config.text, pos), hidden=True)
    return h[0]


def reference_drafts(llm: LLM, seq: list[int], k: int) -> tuple[list[int], list[torch.Tensor]]:
    """The definition written out, no cache: with x_0..x_m known, layer j over positions p = 0..m-1 reads
    h^{j-1}_p and embed(x_{p+j}) (drafts past x_m), eh_proj(cat[enorm(e), hnorm(h)]), its block, its head;
    the draft is the argmax at p = m - 1."""
    model, eps = llm.model, llm.config.text.rms_norm_eps
    m = len(seq) - 1
    h = _main_hidden(llm, seq[:m])
    ext, drafts, logits = list(seq), [], []
    cfg = mtp_config(model, k)
    for j in range(1, k + 1):
        layer = model.mtp[j - 1]
        e = model.embed[torch.tensor(ext[j : m + j])]
        x = (
            torch.cat([_rms(e, layer.enorm.weight, eps), _rms(h, layer.hnorm.weight, eps)], -1)
            @ layer.eh_proj.T
        )
        pos = torch.arange(j, m + j)[None]
        meta = uncached_meta(cfg, pos)
        t = layer.block.attention_type
        rope = rope_tables(model.inv_freq, pos, x.dtype)[t]
        h = layer.block(x[None], rope, meta.types[t], None, j - 1)[0]
        lg = _rms(h[-1], layer.head_norm.weight, eps) @ layer.head.T
        logits.append(lg)
        drafts.append(int(lg.argmax()))
        ext.append(drafts[-1])
    return drafts, logits


@pytest.mark.parametrize("k", [1, 3])
def test_cached_drafter_matches_the_definition_as_rows_advance_unevenly(llm, k):
    torch.manual_seed(0)
    rng = random.Random(k)
    V = llm.config.text.vocab_size
    seqs = [torch.randint(1, V, (n,)).tolist() for n in (40, 25, 33)]
    m = [9, 2, 1]  # tokens known up to x_m; windows of 6 are passed within a few rounds
    drafter = MTPDrafter(llm.model, k, 3, 64, torch.float32, torch.device("cpu"))
    hidden = [_main_hidden(llm, s) for s in seqs]
    new = [hidden[b][: m[b]] for b in range(3)]
    with torch.inference_mode():
        for _ in range(8):
            drafts, logits = drafter.propose(
                new, [s[: m[b] + 1] for b, s in enumerate(seqs)], lambda x: x.argmax(-1)
            )
            for b in range(3):
                ref, ref_logits = reference_drafts(llm, seqs[b][: m[b] + 1], k)
                assert drafts[b].tolist() == ref
                for j in range(k):
                    torch.testing.assert_close(logits[b, j], ref_logits[j], rtol=1e-4, atol=1e-4)
            step = [rng.randint(1, k + 1) for _ in range(3)]
            new = [hidden[b][m[b] : m[b] + step[b]] for b in range(3)]
            m = [m[b] + step[b] for b in range(3)]


def test_sequence_logits_are_the_drafter_maths(llm):
    """`mtp_logits` (training's forward) at the last position of each depth gives the reference drafts'
    logits when the sequence holds those drafts."""
    torch.manual_seed(1)
    seq = torch.randint(1, llm.config.text.vocab_size, (14,)).tolist()
    drafts, ref = reference_drafts(llm, seq, 3)
    full = seq + drafts
    m = len(seq) - 1
    h = _main_hidden(llm, full[:m])
    with torch.inference_mode():
        out = mtp_logits(llm.model, h[None], torch.tensor([full[: m + 3]]), 3)
    for j in range(3):
        torch.testing.assert_close(out[j][0, m - 1], ref[j], rtol=1e-4, atol=1e-4)
