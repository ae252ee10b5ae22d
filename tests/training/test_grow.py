"""Growing a checkpoint into a larger Step shape keeps its function and lets training tell the copies apart."""

from __future__ import annotations

import json

import pytest
import torch
from advisor.engine import LLM

from tests.training.conftest import TINY
from training.card import run_lines
from training.grow import grow_checkpoint
from training.runlog import earlier_runs

# Twice as wide, twice the query heads (same key/value heads), two more MoE layers.
BIG = dict(
    TINY,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=5,
    num_attention_heads=4,
    share_expert_dim=32,
    layer_types=TINY["layer_types"] + ["sliding_attention", "full_attention"],
    moe_layers_enum="1,2,3,4",
    attention_other_setting={"num_attention_heads": 4, "num_attention_groups": 1},
    rope_theta=[1e5, 1e4, 1e5, 1e4, 1e5],
    partial_rotary_factors=[0.5, 1.0, 0.5, 1.0, 0.5],
)


@pytest.fixture(scope="module")
def grown(tmp_path_factory, init_dir):
    # a source whose norms and router biases are not at their initial values, so copying them is tested
    from safetensors.torch import load_file, save_file

    src = tmp_path_factory.mktemp("src")
    for f in init_dir.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    g = torch.Generator().manual_seed(1)
    tensors = {
        k: (t + 0.1 * torch.randn(t.shape, generator=g) if ("norm" in k or "router_bias" in k) else t)
        for k, t in load_file(str(src / "model.safetensors")).items()
    }
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    return src, grow_checkpoint(src, tmp_path_factory.mktemp("grown") / "big", BIG, seed=3)


def test_the_grown_model_computes_the_same_logits(grown):
    src, big = grown
    ids = torch.randint(5, 600, (90,), generator=torch.Generator().manual_seed(0))  # past the 64-token window
    want = LLM.from_pretrained(src).logits(ids)
    got = LLM.from_pretrained(big).logits(ids)
    assert LLM.from_pretrained(big).model.cfg.hidden_size == 64
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_transformers_loads_the_grown_checkpoint_with_the_same_logits(grown):
    from transformers import Step3p7ForConditionalGeneration

    src, big = grown
    ids = torch.randint(5, 600, (1, 40), generator=torch.Generator().manual_seed(1))
    ref = Step3p7ForConditionalGeneration.from_pretrained(big, dtype=torch.float32).eval()
    with torch.no_grad():
        got = ref(input_ids=ids).logits[0]
    want = LLM.from_pretrained(src).logits(ids[0])
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


def test_read_copies_differ_so_training_can_separate_them(grown):
    from safetensors.torch import load_file

    src, big = grown
    t = load_file(str(big / "model.safetensors"))
    old = load_file(str(src / "model.safetensors"))["model.layers.0.self_attn.q_proj.weight"]
    q = t["model.layers.0.self_attn.q_proj.weight"]  # reads the stream: columns j and j + 32 are copies
    assert not torch.allclose(q[:, :32], q[:, 32:])
    torch.testing.assert_close(q[:16, :32] + q[:16, 32:], old[:16])  # new head 0 copies old head 0
    e = t["model.embed_tokens.weight"]  # writes the stream: exact copies
    assert torch.equal(e[:, :32], e[:, 32:])
    assert not t["model.layers.4.self_attn.o_proj.weight"].any()  # a new layer starts as an identity


def test_the_grow_step_is_kept_in_the_runs_and_the_card(grown):
    _, big = grown
    log = json.loads((big / "train_log.json").read_text())
    assert log["config"]["grow"] and log["config"]["init"]
    runs = earlier_runs(big)
    assert runs[-1]["config"]["grow"]
    text = "\n".join(run_lines(runs))
    assert "python -m training.grow <checkpoint of run" in text


def test_a_shape_that_cannot_hold_the_source_is_refused(tmp_path, init_dir):
    with pytest.raises(ValueError, match="hidden_size 48 is not a multiple of the source's 32"):
        grow_checkpoint(init_dir, tmp_path / "bad", dict(BIG, hidden_size=48))
    with pytest.raises(ValueError, match="head_dim differs"):
        grow_checkpoint(init_dir, tmp_path / "bad2", dict(BIG, head_dim=8))
