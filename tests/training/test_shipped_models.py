"""The shipped checkpoints: Step layout, every Step marker in the tokenizer, same logits in the engine and
in transformers, and inside the repository's size budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.text.tokenizer import STEP_SPECIAL_TOKENS

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED = sorted(p for p in MODELS.iterdir() if (p / "config.json").is_file())
# Tokens each verify step adds with all three MTP layers drafting (accepted drafts + the model's own):
# 1.0 would be drafts never accepted; advisor.engine.bench --speculative mtp measured 2.55 over task prompts.
MIN_TOKENS_PER_STEP = 1.5


def test_models_fit_the_budget():
    assert SHIPPED, f"no checkpoint under {MODELS}"
    total = sum(f.stat().st_size for p in SHIPPED for f in p.rglob("*") if f.is_file())
    assert total <= 40 * 10**6, f"{total / 10**6:.1f} MB in models/"


@pytest.mark.parametrize("ckpt", SHIPPED, ids=lambda p: p.name)
def test_engine_and_transformers_agree(ckpt):
    from transformers import Step3p7ForConditionalGeneration

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "README.md",
        "loss.png",
    ):
        assert (ckpt / name).is_file(), f"{ckpt.name}: {name} missing"
    llm = LLM.from_pretrained(ckpt, dtype="float32")  # bf16-stored weights run in fp32 (the endpoints' dtype)
    tok = llm.tokenizer
    assert [tok.token_to_id(t) for t in STEP_SPECIAL_TOKENS] == list(range(len(STEP_SPECIAL_TOKENS)))
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], effort="low")
    ref = Step3p7ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([ids])).logits[0].float()
    assert torch.allclose(llm.logits(ids), want, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("ckpt", SHIPPED, ids=lambda p: p.name)
def test_shipped_mtp_layers_draft_what_the_model_says(ckpt, traces):
    from training.traces import samples

    llm = LLM.from_pretrained(ckpt, dtype="float32")
    assert len(llm.model.mtp) == 3 and llm.speculative is None  # shipped, and off unless asked
    prompts = [llm.tokenizer.encode(s.prompt) for tr in traces[:2] for s in samples(tr, llm.tokenizer)]
    plain = llm.generate_static(prompts, 48)
    assert llm.generate(prompts, 48, speculative="mtp") == plain
    s = llm.last_speculation
    assert (1 + s.accepted / s.row_steps) > MIN_TOKENS_PER_STEP, s.accepted / s.row_steps
