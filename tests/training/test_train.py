"""A few training steps on the engine's own model lower the loss; the checkpoint loads in the engine and in
transformers with the same logits, and the trained weights are what the engine loads."""

from __future__ import annotations

import random

import pytest
import torch
from advisor.engine import LLM
from advisor.engine.text.tokenizer import load_tokenizer

from training.checkpoint import checkpoint_tensors, load_trainable, save_checkpoint, trainable
from training.traces import encode_sample
from training.train import TrainConfig, batches, collate, logits_of, loss_of, lr_at, parse_args


def test_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[100] == pytest.approx(1e-4)


def test_cli_defaults():
    cfg = parse_args(["--model", "step-nano-large", "--tasks", "10", "--families", "arith"])
    assert cfg.out == "models/step-nano-large" and cfg.tasks == 10 and cfg.families == ("arith",)
    assert cfg.digit_group == 1 and parse_args(["--digit-group", "3"]).digit_group == 3


def test_the_data_uses_the_configured_digit_groups(tmp_path):
    from training.train import TrainConfig, build_data

    cfg = TrainConfig(tasks=4, families=("arith",), digit_group=3, recovery_every=0)
    tok_dir, examples, stats = build_data(cfg, tmp_path)
    tok = load_tokenizer(tok_dir)
    assert stats["sequences"] == len(examples) > 0
    assert [tok.decode([i]) for i in tok.encode("1234567")] == ["123", "456", "7"]
    digit_tokens = {tok.decode([i]) for ids, _ in examples for i in ids if tok.decode([i]).isdigit()}
    assert max(map(len, digit_tokens)) == 3  # the numbers of the traces come in groups, not digit by digit


def test_few_steps_lower_the_loss_and_save_a_loadable_checkpoint(tok_dir, init_dir, all_samples, tmp_path):
    torch.manual_seed(0)
    tok = load_tokenizer(tok_dir)
    # the tail of each sample (end of the prompt + the whole target) keeps the steps short
    examples = [tuple(x[-160:] for x in encode_sample(tok, s)) for s in all_samples[:4]]
    model = load_trainable(init_dir)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (idx,) = batches(examples, 4, random.Random(0))
    ids, labels = collate(examples, idx, tok.pad_token_id)
    assert (labels != -100).sum() == sum(sum(1 for y in lab if y != -100) for _, lab in examples)
    losses = []
    with trainable(model):
        for _ in range(8):
            loss = loss_of(model, ids, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        router = next(m for m in model.modules() if hasattr(m, "router_bias"))
        assert router.router.grad is not None and router.router_bias.grad is None
        assert router.gate_up.grad is not None and router.gate_up.grad.abs().sum() > 0
    # the same batch each step: the loss falls, and the last step is the lowest
    assert losses[-1] < losses[0] - 1.0 and losses[-1] == min(losses), losses

    out = save_checkpoint(model.eval(), init_dir, tmp_path / "ckpt")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    probe = ids[0, :48]
    llm = LLM.from_pretrained(out)
    assert llm.tokenizer is not None and llm.tokenizer.chat_template
    engine_logits = llm.logits(probe.tolist())
    with torch.no_grad(), trainable(model):
        direct = logits_of(model, probe[None])[0]  # the forward the loss used
        from advisor.engine.model.cache import uncached_meta

        engine_forward = model(
            model.embed_tokens(probe[None]), uncached_meta(model.cfg, torch.arange(48)[None])
        )[0]
    assert torch.equal(direct, engine_forward)
    with torch.no_grad(), trainable(model):  # the head on assistant positions only = the full loss
        full = logits_of(model, ids)
        ref = torch.nn.functional.cross_entropy(
            full[:, :-1].reshape(-1, full.shape[-1]), labels[:, 1:].reshape(-1)
        )
        assert torch.allclose(loss_of(model, ids, labels), ref, atol=1e-5)
    assert torch.allclose(engine_logits, direct, atol=1e-4)

    from transformers import Step3p7ForConditionalGeneration

    ref = Step3p7ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        ref_logits = ref(input_ids=probe[None]).logits[0]
    assert torch.allclose(engine_logits, ref_logits.float(), atol=1e-4)
    # and the saved tensors are the trained ones, not the initial ones
    init = load_trainable(init_dir)
    assert any(
        not torch.equal(a, b)
        for a, b in zip(checkpoint_tensors(model).values(), checkpoint_tensors(init).values(), strict=True)
    )


def test_continuing_needs_the_same_tokenizer(tok_dir, init_dir, tmp_path):
    from training.train import continue_from

    start = continue_from(init_dir, tok_dir, tmp_path / "start")
    assert (start / "model.safetensors").read_bytes() == (init_dir / "model.safetensors").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer differs"):
        continue_from(other, tok_dir, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        continue_from(tmp_path / "missing", tok_dir, tmp_path / "y")


def test_a_recorded_config_gives_back_its_command():
    from dataclasses import asdict

    from training.runlog import command_of

    cfg = asdict(parse_args(["--model", "step-nano-large", "--lr", "0.001", "--drill-every", "2"]))
    cmd = command_of(cfg)
    assert cmd.startswith("python -m training.train --")
    assert sorted(cmd.split(" --")[1:]) == ["drill-every 2", "lr 0.001", "model step-nano-large"]
    assert parse_args(command_of(cfg).split()[3:]) == parse_args(
        ["--model", "step-nano-large", "--lr", "0.001", "--drill-every", "2"]
    )
    before_drills = {k: v for k, v in cfg.items() if not k.startswith("drill")}
    assert "--drill-warmup 0 --drill-every 0" in command_of(before_drills)


def test_a_shared_prefix_runs_once_with_the_same_values_and_gradients(init_dir):
    """Rows that open alike run their prefix once (one-row KV cache, repeated to every row, then a chunked
    prefill); past the sliding window (64 here) too, the hidden states and every gradient equal the plain
    forward's."""
    from training.train import hidden_of, shared_prefix_len

    torch.manual_seed(0)
    model = load_trainable(init_dir)
    V = model.cfg.vocab_size
    ids = torch.cat([torch.randint(10, V, (1, 100)).expand(3, 100), torch.randint(10, V, (3, 40))], 1)
    ids[2, 120:] = 0  # right padding, as collate leaves it
    assert shared_prefix_len(ids) == 100 and shared_prefix_len(ids[:1]) == 139

    def run(min_shared):
        model.zero_grad(set_to_none=True)
        with trainable(model):
            h = hidden_of(model, ids, min_shared=min_shared)
            (h[:, 90:].pow(2).mean() + h[:, :90].mean()).backward()
        return h.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    (plain, plain_grads), (shared, shared_grads) = run(10**9), run(64)
    assert torch.allclose(plain, shared, atol=1e-5)
    assert plain_grads.keys() == shared_grads.keys() and len(plain_grads) > 10
    for name, g in plain_grads.items():
        assert torch.allclose(g, shared_grads[name], atol=1e-6, rtol=1e-4), name


def test_batches_keep_rows_with_the_same_opening_together():
    # two system prompts (say, two tool sets) of mixed lengths: every batch comes from one of them
    examples = [([1] * 5 + [i % 2] * 3 + [7] * (i % 7), []) for i in range(32)]
    for group in batches(examples, 4, random.Random(0), key_tokens=8):
        assert len({tuple(examples[i][0][:8]) for i in group}) == 1
    assert sorted(i for g in batches(examples, 4, random.Random(0)) for i in g) == list(range(32))


def test_a_continued_run_encodes_its_data_with_its_models_tokenizer(init_dir, tmp_path):
    from training.train import build_data

    cfg = TrainConfig(tasks=3, families=("arith",), recovery_every=0, init=str(init_dir), vocab_size=4096)
    tok_dir, examples, _ = build_data(cfg, tmp_path)
    assert (tok_dir / "tokenizer.json").read_bytes() == (init_dir / "tokenizer.json").read_bytes()
    assert max(i for ids, _ in examples for i in ids) < load_tokenizer(init_dir).vocab_size
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        build_data(TrainConfig(tasks=1, families=("arith",), init=str(tmp_path / "none")), tmp_path / "w")
