"""Quantized checkpoints end to end: `advisor.engine.quantize` writes each published layout, the engine loads it
kept quantized (resident bytes against the file's), and its logits and generations equal those of the same
model with its weights dequantized to fp32 (text, image, with and without the KV cache, through the
compiled ops' register decoding and through the per-expert scratch path); bad files are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.model import cpu_decode
from advisor.engine.model.layers import Quantized
from advisor.engine.model.loader import CheckpointError
from advisor.engine.quant.packed import weight_bytes
from advisor.engine.quantize import dequantize_checkpoint, main, quantize_checkpoint
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.engine.step_models import TEXT_A, TEXT_C, build_reference, rel_err, save_reference

# Widths that take groups of 128 (so int4 at group 128 quantizes most projections), MoE and dense layers.
TEXT_Q = dict(
    TEXT_A,
    hidden_size=128,
    intermediate_size=128,
    head_dim=32,
    moe_intermediate_size=128,
    share_expert_dim=64,
)
CASES = [("fp8", None), ("nvfp4", None), ("int4", 32), ("int4", 128)]
VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=112, patch_size=14, mlp_ratio=2.0
)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    d = tmp_path_factory.mktemp("qsrc")
    path = save_reference(build_reference(TEXT_Q, seed=3), d / "ckpt")
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages }}"}))
    return path


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}-g{c[1]}" if c[1] else c[0])
def pair(request, src, tmp_path_factory):
    fmt, group = request.param
    d = tmp_path_factory.mktemp(f"q-{fmt}")
    summary = quantize_checkpoint(src, d / "q", fmt, group)
    dequantize_checkpoint(d / "q", d / "deq")
    return fmt, d / "q", LLM.from_pretrained(d / "q"), LLM.from_pretrained(d / "deq"), summary


def _quantized_layouts(llm):
    return [m for m in llm.model.modules() if isinstance(getattr(m, "layout", None), Quantized)]


def test_the_published_layout_is_written(pair):
    fmt, path, llm, _, summary = pair
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert (path / "tokenizer_config.json").exists()  # side files carried over
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        if fmt == "fp8":
            assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
            assert f.get_tensor("model.layers.1.moe.gate_proj.weight").dtype is torch.float8_e4m3fn
            assert f.get_tensor("model.layers.1.moe.gate_proj.weight_scale_inv").shape == (8, 1, 1)
            assert "lm_head" in qc["modules_to_not_convert"]
        elif fmt == "nvfp4":
            hf = json.loads((path / "hf_quant_config.json").read_text())
            assert hf["quantization"]["quant_algo"] == "NVFP4" and qc["quant_method"] == "modelopt"
            base = "model.language_model.layers.1.moe.gate_proj"
            assert f.get_tensor(f"{base}.weight").dtype is torch.uint8
            assert f.get_tensor(f"{base}.weight").shape == (8, 128, 64)
            assert f.get_tensor(f"{base}.weight_scale").dtype is torch.float8_e4m3fn
            assert f.get_tensor(f"{base}.weight_scale_2").shape == (8,)
            assert f"{base}.input_scale" in keys and "lm_head.weight" in keys
            assert "model.language_model.layers.1.moe.gate.weight" in keys  # the router stays full precision
        else:
            assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
            w = qc["config_groups"]["group_0"]["weights"]
            assert (w["num_bits"], w["symmetric"], w["strategy"]) == (4, True, "group")
            assert f.get_tensor("model.layers.1.moe.down_proj.weight_packed").dtype is torch.int32
            assert f.get_tensor("model.layers.1.moe.down_proj.weight_shape").tolist() == [8, 128, 128]
    assert summary["quantized"] > 0 and _quantized_layouts(llm)


def test_kept_quantized_in_memory(pair):
    fmt, path, llm, deq, summary = pair
    disk = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    resident = weight_bytes(llm.model, llm.vision)
    assert resident <= 1.15 * disk, (resident, disk)
    assert resident < 0.75 * weight_bytes(deq.model, deq.vision)
    for layer in llm.model.layers:
        if hasattr(layer.mlp, "q_gate_up"):
            assert "gate_up" not in layer.mlp._parameters  # no full-precision copy of the experts


def test_logits_equal_the_dequantized_model(pair):
    _, _, llm, deq, _ = pair
    ids = [[5, 17, 33, 2, 9, 100, 3, 4, 77, 12]]
    assert rel_err(llm.logits(ids), deq.logits(ids)) < 1e-4
    # a long prompt: the experts past the register path's 32 pairs per expert, projections past 64 rows
    long = torch.randint(1, 255, (2, 120), generator=torch.Generator().manual_seed(0))
    assert rel_err(llm.logits(long), deq.logits(long)) < 1e-4


def test_generations_are_identical_with_and_without_the_cache(pair):
    _, _, llm, deq, _ = pair
    prompts = [[5, 17, 33], [7, 8, 9, 10, 11, 1]]
    want = deq.generate(prompts, 12, stop_token_ids=[])
    assert llm.generate(prompts, 12, stop_token_ids=[]) == want
    assert llm.generate(prompts, 12, stop_token_ids=[], use_cache=False) == want


def test_the_pytorch_path_matches_too(pair, monkeypatch):
    """Without the compiled ops (no toolchain): every quantized weight dequantized per call."""
    _, _, llm, deq, _ = pair
    ids = [[5, 17, 33, 2, 9, 100]]
    want = deq.logits(ids)
    monkeypatch.setitem(cpu_decode._state, "ops", None)
    assert rel_err(llm.logits(ids), want) < 1e-4


def test_mixed_checkpoint_experts_only_from_bf16(tmp_path):
    """Quantized experts beside BF16 attention, router and norms (the published NVFP4 export's mix)."""
    path = save_reference(build_reference(TEXT_A, seed=5), tmp_path / "bf16", dtype=torch.bfloat16)
    quantize_checkpoint(path, tmp_path / "q", "nvfp4", experts_only=True)
    dequantize_checkpoint(tmp_path / "q", tmp_path / "deq")
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.language_model.layers.0.self_attn.q_proj.weight").dtype is torch.bfloat16
    llm = LLM.from_pretrained(tmp_path / "q", dtype="float32")
    deq = LLM.from_pretrained(tmp_path / "deq", dtype="float32")
    assert not _quantized_layouts(llm) and hasattr(llm.model.layers[1].mlp, "q_gate_up")
    ids = [[3, 4, 5, 6, 7]]
    assert rel_err(llm.logits(ids), deq.logits(ids)) < 1e-4
    assert llm.generate(ids, 8, stop_token_ids=[]) == deq.generate(ids, 8, stop_token_ids=[])


def test_images_through_a_quantized_model(tmp_path):
    ref = build_reference(TEXT_C, seed=11, vision=VISION)
    path = save_reference(ref, tmp_path / "ckpt")
    quantize_checkpoint(path, tmp_path / "q", "int4", 32)
    dequantize_checkpoint(tmp_path / "q", tmp_path / "deq")
    llm, deq = LLM.from_pretrained(tmp_path / "q"), LLM.from_pretrained(tmp_path / "deq")
    assert llm.vision is not None
    pixel_values = torch.randn(1, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    ids = [5, 9, 17] + [llm.config.image_token_id] * 4 + [33, 2]
    kwargs = dict(pixel_values=pixel_values)
    assert rel_err(llm.logits(ids, **kwargs), deq.logits(ids, **kwargs)) < 1e-4
    img = {"pixel_values": pixel_values}
    assert llm.generate([ids], 8, stop_token_ids=[], images=[img]) == deq.generate(
        [ids], 8, stop_token_ids=[], images=[img]
    )


# ----------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small_q(tmp_path_factory):
    d = tmp_path_factory.mktemp("qerr")
    src = save_reference(build_reference(TEXT_A, seed=1), d / "src")
    out = {}
    for fmt, g in [("fp8", None), ("nvfp4", None), ("int4", 32)]:
        quantize_checkpoint(src, d / fmt, fmt, g)
        out[fmt] = d / fmt
    return out


def _edit(tmp_path, src, fn):
    import shutil

    dst = tmp_path / "edited"
    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    t = load_file(f)
    fn(t)
    save_file(t, f)
    return dst


@pytest.mark.parametrize(
    "fmt, scale",
    [
        ("fp8", "model.layers.1.moe.down_proj.weight_scale_inv"),
        ("nvfp4", "model.language_model.layers.1.moe.down_proj.weight_scale"),
        ("int4", "model.layers.1.moe.down_proj.weight_scale"),
    ],
)
def test_missing_and_misshapen_scales_are_named(small_q, tmp_path, fmt, scale):
    path = _edit(tmp_path, small_q[fmt], lambda t: t.pop(scale))
    with pytest.raises(CheckpointError) as e:
        LLM.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors" in msg and "is missing" in msg
    assert scale.removeprefix("model.language_model.").removeprefix("model.") in msg
    assert "down_proj.weight" in msg and "[8, 64, " in msg  # the weight and its shape

    def widen(t):
        t[scale] = torch.cat([t[scale], t[scale]], -1)

    path = _edit(tmp_path / "b", small_q[fmt], widen)
    with pytest.raises(CheckpointError) as e:
        LLM.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors" in msg and scale in msg and "expected" in msg
    assert msg.count("[") >= 3  # the scale's shape, the expected one, the weight's


@pytest.mark.parametrize("suffix", ["weight_scale_2", "input_scale"])
def test_nvfp4_per_matrix_scales_of_the_wrong_shape_are_named(small_q, tmp_path, suffix):
    """The packed experts' weight_scale_2 / input_scale: [] or one per expert [E], nothing else."""
    name = f"model.language_model.layers.1.moe.down_proj.{suffix}"

    def per_row(t):
        t[name] = torch.ones(8, 64)

    path = _edit(tmp_path, small_q["nvfp4"], per_row)
    with pytest.raises(CheckpointError) as e:
        LLM.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and name in msg and "[8, 64]" in msg and "expected [] or [8]" in msg
    # one per expert is the other published form (vLLM's step3p5 loader takes both)
    path = _edit(tmp_path / "b", small_q["nvfp4"], lambda t: t.__setitem__(name, torch.ones(8)))
    assert LLM.from_pretrained(path).logits([1, 2, 3]).shape == (3, 256)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4"])
def test_a_quantized_lm_head_loads_kept_quantized(src, tmp_path, fmt):
    """`--lm-head`: the head written in the format's layout (compressed-tensors: targeted by name, out of
    `ignore`; ModelOpt: out of `exclude_modules`), loaded as a quantized projection; logits equal the
    dequantized model's, and the unquantized-head export of the same model still loads (both forms)."""
    quantize_checkpoint(src, tmp_path / "q", fmt, 32 if fmt == "int4" else None, lm_head=True)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    names = safe_open(str(tmp_path / "q" / "model.safetensors"), "pt").keys()
    if fmt == "int4":
        assert "re:^lm_head$" in qc["config_groups"]["group_0"]["targets"] and "lm_head" not in qc["ignore"]
        assert {"lm_head.weight_packed", "lm_head.weight_scale", "lm_head.weight_shape"} <= set(names)
    else:
        assert "lm_head" not in qc["exclude_modules"]
        assert {"lm_head.weight", "lm_head.weight_scale", "lm_head.weight_scale_2"} <= set(names)
    dequantize_checkpoint(tmp_path / "q", tmp_path / "deq")
    llm, deq = LLM.from_pretrained(tmp_path / "q"), LLM.from_pretrained(tmp_path / "deq")
    assert isinstance(llm.model.lm_head.layout, Quantized) and llm.model.lm_head.weight is None
    ids = [[5, 17, 33, 2, 9, 100, 3]]
    assert rel_err(llm.logits(ids), deq.logits(ids)) < 1e-4
    quantize_checkpoint(src, tmp_path / "plain", fmt, 32 if fmt == "int4" else None)
    plain = LLM.from_pretrained(tmp_path / "plain")
    assert not isinstance(plain.model.lm_head.layout, Quantized)
    assert weight_bytes(llm.model) < weight_bytes(plain.model)


def test_unknown_quant_method_is_one_line(small_q, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(small_q["fp8"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["quant_method"] = "awq"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"config\.json: unknown quant_method 'awq'") as e:
        LLM.from_pretrained(path)
    assert "\n" not in str(e.value)


def test_quantized_tensors_without_a_config_are_refused(small_q, tmp_path):
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(small_q["int4"], path)
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="belongs to a quantized export"):
        LLM.from_pretrained(path)


def test_cli(small_q, tmp_path, capsys):
    src = small_q["fp8"].parent / "src"
    assert main([str(src), str(tmp_path / "out"), "--format", "int4", "--group", "32"]) == 0
    assert "int4" in capsys.readouterr().out
    assert LLM.from_pretrained(tmp_path / "out").logits([1, 2, 3]).shape == (3, 256)
    assert main([str(src), str(tmp_path / "out"), "--format", "int4"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main([str(src), str(tmp_path / "head"), "--format", "int4", "--group", "32", "--lm-head"]) == 0
    assert "lm_head.weight_packed" in safe_open(str(tmp_path / "head" / "model.safetensors"), "pt").keys()


def test_decode_runs_through_the_register_decoding_ops(pair, monkeypatch):
    """A decode step takes qlinear and decode_moe_q (not a silent fallback); a long prompt the scratch path."""
    _, _, llm, _, _ = pair
    ops = cpu_decode.ops()
    if ops is None:
        pytest.skip("no compiled CPU ops on this machine")
    calls = []

    class Counting:
        def __getattr__(self, name):
            fn = getattr(ops, name)
            return lambda *a: calls.append(name) or fn(*a)

    monkeypatch.setitem(cpu_decode._state, "ops", Counting())
    llm.generate([[5, 6, 7]], 2, stop_token_ids=[])
    assert "qlinear" in calls and "decode_moe_q" in calls
    calls.clear()
    llm.logits(torch.randint(1, 255, (1, 200)))
    assert "qdequant" in calls and "decode_moe_q" not in calls
