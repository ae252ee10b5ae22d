"""training.mtp: a short seeded run trains the MTP layers of a checkpoint with its main model frozen,
reproducibly; they are saved under the published names and the engine drafts with them; transformers
still loads the checkpoint with the same logits; the sliding-window cut leaves the loss unchanged."""

from __future__ import annotations

import shutil

import torch
from advisor.engine import LLM
from advisor.engine.model.config import load_config
from safetensors.torch import load_file

from training.checkpoint import load_trainable
from training.mtp import (
    init_mtp,
    main_hidden,
    mtp_loss,
    parse_args,
    receptive_field,
    train_mtp,
    with_mtp_config,
)


def _run(src, dst, work, seed=3):
    shutil.copytree(src, dst)
    argv = [str(dst), "--tasks", "3", "--families", "arith", "--seed", str(seed), "--epochs", "2"]
    argv += ["--batch-size", "2", "--log-every", "1", "--work", str(work), "--lr", "3e-3"]
    return train_mtp(parse_args(argv))


def test_a_short_run_trains_saves_and_drafts(init_dir, tmp_path):
    from transformers import Step3p7ForConditionalGeneration

    log = _run(init_dir, tmp_path / "a", tmp_path / "work")
    ckpt = tmp_path / "a"
    losses = log["depth_loss"]
    assert sum(losses[-1]) < sum(losses[0])  # the same batches again in the second epoch
    before, after = load_file(str(init_dir / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    n = load_config(init_dir).text.num_hidden_layers
    new = set(after) - set(before)
    assert {k.split(".")[2] for k in new} == {str(n), str(n + 1), str(n + 2)}
    for j in range(3):
        for name in ("eh_proj.weight", "enorm.weight", "hnorm.weight", "transformer.shared_head.norm.weight"):
            assert f"model.layers.{n + j}.{name}" in new
        assert f"model.layers.{n + j}.transformer.shared_head.output.weight" in new
        assert f"model.layers.{n + j}.mlp.gate_proj.weight" in new  # a dense block
    for key, t in before.items():  # the main model (and the vision tower) untouched
        assert torch.equal(after[key], t), key
    assert (ckpt / "mtp_loss.png").is_file() and "## MTP layers" in (ckpt / "README.md").read_text()
    cfg = load_config(ckpt).text
    assert len(cfg.mtp_layers) == 3 and all(s.attention == "sliding_attention" for s in cfg.mtp_layers)

    llm = LLM.from_pretrained(ckpt, speculative="mtp")
    prompt = [5, 9, 11, 30, 2, 7]
    assert llm.generate([prompt], 12, stop_token_ids=[]) == llm.generate(
        [prompt], 12, stop_token_ids=[], speculative="off"
    )
    ref = Step3p7ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor([prompt])).logits[0]
    assert torch.allclose(llm.logits(prompt), want, atol=1e-4, rtol=1e-4)

    again = _run(init_dir, tmp_path / "b", tmp_path / "work2")
    assert again["depth_loss"] == log["depth_loss"]
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert all(torch.equal(after[k], b[k]) for k in new)


def test_the_window_cut_does_not_change_the_loss(init_dir, tmp_path):
    model = load_trainable(init_dir)
    tc = load_config(with_mtp_config(init_dir, 3, tmp_path / "cfg")).text
    init_mtp(model, tc, 0)
    torch.manual_seed(0)
    V, T = tc.vocab_size, 400
    ids = torch.randint(1, V, (2, T))
    labels = torch.full((2, T), -100)
    labels[:, 330:360] = ids[:, 330:360]
    whole = main_hidden(model, ids, labels, None)
    cut = main_hidden(model, ids, labels, receptive_field(tc))
    assert cut[3] > 0
    _, a = mtp_loss(model, *whole)
    _, b = mtp_loss(model, *cut)
    assert torch.allclose(torch.tensor(a), torch.tensor(b), rtol=1e-5)
