"""Checkpoint loading: both config dialects, shards, dtypes, MTP layers, and one-line errors."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.model.config import FULL, SLIDING, ConfigError, load_config, parse_config
from advisor.engine.model.loader import CheckpointError
from safetensors.torch import load_file, save_file

from tests.engine.step_models import TEXT_A, build_reference, rel_err, save_reference


@pytest.fixture(scope="module")
def ref_a():
    return build_reference(TEXT_A, seed=7)


@pytest.fixture(scope="module")
def ckpt_a(ref_a, tmp_path_factory):
    return save_reference(ref_a, tmp_path_factory.mktemp("a") / "ckpt")


def _copy(src, tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _hub_config(transformers_cfg: dict) -> dict:
    """The same model as the hub publishes its config: padded per-layer lists and legacy aliases."""
    text = copy.deepcopy(TEXT_A)
    text["model_type"] = "step3p5"
    text["num_attention_groups"] = text.pop("num_key_value_heads")
    text["moe_num_experts"] = text.pop("n_routed_experts")
    text["moe_top_k"] = text.pop("num_experts_per_tok")
    text["moe_layers_enum"] = "1,3,4"
    text["use_head_wise_attn_gate"] = True
    return {
        "architectures": ["Step3p7ForConditionalGeneration"],
        "model_type": "step3p7",
        "image_token_id": transformers_cfg["image_token_id"],
        "vision_config": transformers_cfg["vision_config"],
        "text_config": text,
        "torch_dtype": "float32",
    }


def test_config_dialects_normalise_to_the_same_model(ckpt_a, tmp_path):
    tf_raw = json.loads((ckpt_a / "config.json").read_text())
    tf = parse_config(tf_raw).text
    hub = parse_config(_hub_config(tf_raw)).text
    # The transformers dialect drops the MTP entries of swiglu_limits*; everything else is identical.
    hub_cmp = replace(
        hub, mtp_layers=[replace(s, swiglu_limit=0.0, swiglu_limit_shared=0.0) for s in hub.mtp_layers]
    )
    assert hub_cmp == tf
    assert [s.attention for s in tf.layers] == [FULL, SLIDING, SLIDING, FULL]
    assert [s.num_heads for s in tf.layers] == [4, 8, 8, 4]
    assert [s.mlp for s in tf.layers] == ["dense", "sparse", "dense", "sparse"]
    assert [s.swiglu_limit for s in tf.layers] == [0, 0.3, 0, 0.2]
    assert tf.rope[FULL].rope_type == "llama3" and tf.rope[FULL].partial_rotary_factor == 0.5
    assert tf.rope[SLIDING].theta == 1e4 and tf.rope[SLIDING].rope_type == "default"
    assert len(tf.mtp_layers) == 1 and hub.mtp_layers[0].swiglu_limit == 0.2

    # The hub-style directory loads to the same numbers.
    hub_dir = _copy(ckpt_a, tmp_path)
    (hub_dir / "config.json").write_text(json.dumps(_hub_config(tf_raw)))
    ids = list(range(3, 40))
    assert rel_err(LLM.from_pretrained(hub_dir).logits(ids), LLM.from_pretrained(ckpt_a).logits(ids)) < 1e-6


def test_sharded_checkpoint_with_index(ref_a, ckpt_a, tmp_path):
    path = save_reference(ref_a, tmp_path / "sharded", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("*.safetensors"))) > 2
    ids = list(range(5, 30))
    # Same weights; only buffer alignment differs, which can change the last bit of a matmul.
    assert rel_err(LLM.from_pretrained(path).logits(ids), LLM.from_pretrained(ckpt_a).logits(ids)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints(ref_a, tmp_path, dtype):
    path = save_reference(ref_a, tmp_path / "half", dtype=dtype)
    llm = LLM.from_pretrained(path)  # dtype=None: the checkpoint's own
    assert llm.dtype == dtype and llm.model.embed.dtype == dtype
    assert llm.model.layers[1].mlp.router.dtype == torch.float32  # the router decides in fp32
    ids = list(range(5, 30))
    with torch.no_grad():
        want = ref_a(input_ids=torch.tensor([ids])).logits[0]
    got = llm.logits(ids)
    assert got.dtype == torch.float32
    assert rel_err(got, want) < 0.1  # half-precision weights, fp32 reference
    assert LLM.from_pretrained(path, dtype="float32").model.embed.dtype == torch.float32


def test_mtp_layers_load_when_present(ckpt_a, tmp_path):
    path = _copy(ckpt_a, tmp_path)
    tensors = load_file(path / "model.safetensors")
    cfg = load_config(path).text
    h, v, n = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    # The MTP layer is sliding + MoE (mtp_layer_types), like layer 1; plus its own projections and head.
    block = {
        k.replace("model.layers.1.", f"model.layers.{n}."): torch.randn(t.shape, generator=g)
        for k, t in tensors.items()
        if k.startswith("model.layers.1.")
    }
    extra = {
        f"model.layers.{n}.eh_proj.weight": torch.randn(h, 2 * h, generator=g),
        f"model.layers.{n}.enorm.weight": torch.randn(h, generator=g),
        f"model.layers.{n}.hnorm.weight": torch.randn(h, generator=g),
        f"model.layers.{n}.transformer.shared_head.norm.weight": torch.randn(h, generator=g),
        f"model.layers.{n}.transformer.shared_head.output.weight": torch.randn(v, h, generator=g),
    }
    save_file({**tensors, **block, **extra}, path / "model.safetensors", metadata={"format": "pt"})
    llm = LLM.from_pretrained(path)
    assert len(llm.model.mtp) == 1
    assert torch.equal(llm.model.mtp[0].eh_proj, extra[f"model.layers.{n}.eh_proj.weight"])
    assert torch.equal(llm.model.mtp[0].block.mlp.router, block[f"model.layers.{n}.moe.gate.weight"])
    # An incomplete MTP layer is an error naming the missing tensor.
    del extra[f"model.layers.{n}.hnorm.weight"]
    save_file({**tensors, **block, **extra}, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"missing tensor model\.layers\.{n}\.hnorm\.weight"):
        LLM.from_pretrained(path)


def _rewrite(path, fn):
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(ckpt_a, tmp_path):
    path = _copy(ckpt_a, tmp_path)
    _rewrite(path, lambda t: t.pop("model.layers.3.moe.up_proj.weight"))
    with pytest.raises(
        CheckpointError,
        match=r"missing tensor model\.layers\.3\.moe\.up_proj\.weight \(expected shape \[8, 32, 64\]\)",
    ):
        LLM.from_pretrained(path)


def test_wrong_shape_names_both_shapes(ckpt_a, tmp_path):
    path = _copy(ckpt_a, tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(64, 64)}))
    with pytest.raises(CheckpointError) as e:
        LLM.from_pretrained(path)
    msg = str(e.value)
    assert "model.layers.1.self_attn.q_proj.weight" in msg and "[64, 64]" in msg and "[128, 64]" in msg
    assert "\n" not in msg


def test_unexpected_tensor_is_named(ckpt_a, tmp_path):
    path = _copy(ckpt_a, tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.2.moe.gate.weight": torch.zeros(8, 64)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensor model\.layers\.2\.moe\.gate\.weight with shape \[8, 64\]"
    ):
        LLM.from_pretrained(path)


def test_truncated_and_corrupt_files(ckpt_a, tmp_path):
    path = _copy(ckpt_a, tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated safetensors file") as e:
        LLM.from_pretrained(path)
    assert "\n" not in str(e.value)
    f.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt"):
        LLM.from_pretrained(path)


def test_index_naming_a_missing_shard(ref_a, tmp_path):
    path = save_reference(ref_a, tmp_path / "sharded", max_shard_size="40KB")
    victim = sorted(path.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"names shard {victim.name}, which is missing"):
        LLM.from_pretrained(path)


def test_bad_config_is_a_one_line_error(ckpt_a, tmp_path):
    path = _copy(ckpt_a, tmp_path)
    raw = json.loads((path / "config.json").read_text())
    raw["text_config"]["layer_types"][1] = "minimax_m3_sparse"
    (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="unsupported layer type 'minimax_m3_sparse'"):
        LLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        LLM.from_pretrained(tmp_path / "nowhere")


def test_tokenizer_is_exposed_when_the_checkpoint_ships_one(ckpt_a, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    assert LLM.from_pretrained(ckpt_a).tokenizer is None
    path = _copy(ckpt_a, tmp_path)
    tok = Tokenizer(
        models.WordLevel({"<unk>": 0, "hello": 1, "world": 2, "<|im_end|>": 3}, unk_token="<unk>")
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    llm = LLM.from_pretrained(path)
    assert llm.tokenizer is not None
    assert type(llm.tokenizer).__name__ == "StepTokenizer"  # advisor.engine.text.tokenizer's, not the raw fallback
    assert llm.tokenizer.encode("hello world") == [1, 2]
    assert llm.eos_token_ids == [3]  # no eos in config.json: the tokenizer's <|im_end|>


def test_quantized_exports_are_refused_by_name(ckpt_a, tmp_path):
    path = _copy(ckpt_a, tmp_path)
    _rewrite(path, lambda t: t.update({"model.layers.1.moe.down_proj.weight_scale": torch.ones(8)}))
    with pytest.raises(
        CheckpointError, match=r"down_proj\.weight_scale \(F32\) belongs to a quantized export"
    ):
        LLM.from_pretrained(path)


def test_release_sized_config_builds_the_196b_backbone_on_meta():
    """The hub config's numbers (per the model facts) give the published size: heads, experts, dense layers."""
    from advisor.engine.model.backbone import StepTextModel

    n = 45
    text = {
        "model_type": "step3p5",
        "vocab_size": 128896,
        "hidden_size": 4096,
        "intermediate_size": 11264,
        "num_hidden_layers": n,
        "num_attention_heads": 64,
        "num_attention_groups": 8,
        "head_dim": 128,
        "moe_num_experts": 288,
        "moe_top_k": 8,
        "moe_intermediate_size": 1280,
        "share_expert_dim": 1280,
        "moe_layers_enum": ",".join(str(i) for i in range(3, n)),
        "num_nextn_predict_layers": 3,
        "sliding_window": 512,
        "layer_types": ["full_attention" if i % 4 == 0 else "sliding_attention" for i in range(n)]
        + ["sliding_attention"] * 3,
        "attention_other_setting": {"attention_type": "sliding_attention", "num_attention_heads": 96},
        "rope_theta": [5e6 if i % 4 == 0 else 1e4 for i in range(n)] + [1e4] * 3,
        "partial_rotary_factors": [0.5 if i % 4 == 0 else 1.0 for i in range(n)] + [1.0] * 3,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 2.0,
            "original_max_position_embeddings": 131072,
            "low_freq_factor": 1.0,
            "high_freq_factor": 32.0,
        },
        "swiglu_limits": [0.0] * 43 + [7.0, 7.0, 0.0, 0.0, 0.0],
        "swiglu_limits_shared": [0.0] * 44 + [16.0, 0.0, 0.0, 0.0],
        "moe_router_scaling_factor": 3.0,
    }
    cfg = parse_config({"model_type": "step3p7", "text_config": text}).text
    assert sum(s.attention == FULL for s in cfg.layers) == 12 and len(cfg.mtp_layers) == 3
    assert cfg.layers[44].swiglu_limit == 7.0 and cfg.layers[44].swiglu_limit_shared == 16.0
    with torch.device("meta"):
        model = StepTextModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    assert 195e9 < total < 197.5e9, total
    spec = model.checkpoint_spec()
    assert spec["layers.1.attn.qkvg.weight"][0][0] == (
        "model.layers.1.self_attn.q_proj.weight",
        (96 * 128, 4096),
    )
    assert spec["layers.3.mlp.gate_up"][0][0] == ("model.layers.3.moe.gate_proj.weight", (288, 1280, 4096))
