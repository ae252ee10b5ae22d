"""Shared fixtures: a few real traces, the project tokenizer built from them, a tiny initial checkpoint."""

from __future__ import annotations

import asyncio

import pytest
from advisor.engine.text.tokenizer import build_step_tokenizer

from training.checkpoint import init_checkpoint, text_config
from training.tasks import generate
from training.tokenizer import build_project_tokenizer
from training.traces import run_traces, samples

# The Step layout in miniature: a dense full-attention layer, then a sliding MoE layer (shared expert,
# sigmoid router, top-2 of 4) and a full MoE layer.
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    moe_intermediate_size=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    share_expert_dim=16,
    sliding_window=64,
    layer_types=["full_attention", "sliding_attention", "full_attention"],
    moe_layers_enum="1,2",
    attention_other_setting={"num_attention_heads": 2, "num_attention_groups": 1},
    rope_theta=[1e5, 1e4, 1e5],
    partial_rotary_factors=[0.5, 1.0, 0.5],
    moe_router_scaling_factor=1.0,
    max_position_embeddings=4096,
)


@pytest.fixture(scope="session")
def traces():
    # the own families, and the image family (a find_regions call on a generated PNG)
    tasks = [*generate(6, seed=11), *generate(1, seed=11, families=("evals.marks",))]
    return asyncio.run(run_traces(tasks))


@pytest.fixture(scope="session")
def boot_tokenizer(tmp_path_factory):
    return build_step_tokenizer(tmp_path_factory.mktemp("boot_tok"))


@pytest.fixture(scope="session")
def all_samples(traces, boot_tokenizer):
    return [s for tr in traces for s in samples(tr, boot_tokenizer)]


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, all_samples):
    path = tmp_path_factory.mktemp("project_tok")
    build_project_tokenizer(path, all_samples, vocab_size=700)
    return path


@pytest.fixture(scope="session")
def init_dir(tmp_path_factory, tok_dir):
    from advisor.engine.text.tokenizer import load_tokenizer

    path = tmp_path_factory.mktemp("init_ckpt")
    return init_checkpoint(path, text_config(TINY, load_tokenizer(tok_dir)), tok_dir, seed=0)
