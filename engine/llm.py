"""`LLM`: the engine's public face: load a checkpoint directory, score sequences, generate."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from advisor.engine.model.backbone import StepTextModel
from advisor.engine.model.cache import KVCache, uncached_meta
from advisor.engine.model.config import ModelConfig, load_config
from advisor.engine.model.loader import (
    Checkpoint,
    CheckpointError,
    check_unexpected,
    load_spec,
    resolve_dtype,
)
from advisor.engine.model.sampling import sample
from advisor.engine.model.speculative import SpeculativeDecoder
from advisor.engine.quant.scheme import SchemeError, read_scheme

log = logging.getLogger(__name__)

_VISION_PREFIXES = ("vision_model.", "vit_downsampler", "vit_large_projector.")

# Per-prompt image arguments for generate(): pixel_values, pixel_values_local, num_local_patches.
ImageInputs = dict[str, Any]


class LLM:
    def __init__(
        self,
        config: ModelConfig,
        model: StepTextModel,
        *,
        device: torch.device,
        dtype: torch.dtype,
        path: Path | None = None,
        vision: Any = None,
        tokenizer: Any = None,
        max_batch_size: int = 16,
        speculative: str | None = None,
        num_speculative_tokens: int | None = None,
    ):
        self.config = config
        self.model = model
        self.device, self.dtype = device, dtype
        self.path = path
        self.vision = vision
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self._core = None
        self.speculative, self.num_speculative_tokens = speculative, num_speculative_tokens
        self._spec_k(speculative, num_speculative_tokens)  # a bad option fails at load, not at the first call
        # the counts of the last speculative call (`SpeculationStats`, or the static path's decoder)
        self.last_speculation: SpeculationStats | SpeculativeDecoder | None = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        max_batch_size: int = 16,
        speculative: str | None = None,
        num_speculative_tokens: int | None = None,
    ) -> LLM:
        """Load a HF-layout Step checkpoint directory (config.json + *.safetensors [+ index, tokenizer]).

        speculative="mtp": decode speculatively, the checkpoint's MTP layers drafting
        `num_speculative_tokens` (1 to the number of MTP layers, default all) per verify step of the model.
        """
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a checkpoint directory")
        cfg = load_config(path)
        device = torch.device(device)
        try:
            scheme = read_scheme(path, json.loads((path / "config.json").read_text()))
        except SchemeError as e:
            raise CheckpointError(str(e)) from None
        ckpt = Checkpoint(path, scheme)
        try:
            dtype = resolve_dtype(dtype, cfg.dtype)
            tc = cfg.text
            # MTP layers are optional in a checkpoint (transformers' save_pretrained drops them).
            mtp_prefixes = tuple(
                f"model.layers.{tc.num_hidden_layers + j}." for j in range(len(tc.mtp_layers))
            )
            with_mtp = bool(mtp_prefixes) and any(k.startswith(mtp_prefixes) for k in ckpt.keys())
            with torch.device("meta"):
                model = StepTextModel(tc, with_mtp=with_mtp)
            used = load_spec(model, model.checkpoint_spec(), ckpt, dtype, device)
            model.finalize(device)
            vision, vision_used = _load_vision(cfg, ckpt, dtype, device)
            ignored = _VISION_PREFIXES if vision is None else ()
            check_unexpected(ckpt, used | vision_used, ignored)
        finally:
            ckpt.close()
        model.eval()
        return cls(
            cfg,
            model,
            device=device,
            dtype=dtype,
            path=path,
            vision=vision,
            tokenizer=_load_tokenizer(path),
            max_batch_size=max_batch_size,
            speculative=speculative,
            num_speculative_tokens=num_speculative_tokens,
        )

    def _spec_k(self, speculative: str | None, k: int | None) -> int:
        """Drafts per verify step for these options (0: plain decoding), or a one-line ValueError."""
        if speculative in (None, "", "none", "off"):
            return 0
        if speculative != "mtp":
            raise ValueError(f"speculative: unknown method {speculative!r} (supported: 'mtp')")
        n = len(self.model.mtp)
        if n == 0:
            where = self.path or "this checkpoint"
            raise ValueError(
                f"speculative='mtp': {where} has no MTP layers (model.layers.N+j.*) to draft with"
            )
        k = n if k is None else int(k)
        if not 1 <= k <= n:
            raise ValueError(
                f"num_speculative_tokens={k}: must be between 1 and the checkpoint's {n} MTP layers"
            )
        return k

    def _call_spec_k(self, speculative: str | None, k: int | None) -> int:
        """A call's drafts per verify step: its own options, else the LLM's."""
        if speculative is None:
            speculative, k = self.speculative, (self.num_speculative_tokens if k is None else k)
        return self._spec_k(speculative, k)

    @property
    def eos_token_ids(self) -> list[int]:
        """The config's eos ids; without any, the tokenizer's (e.g. `<|im_end|>`)."""
        ids = list(self.config.text.eos_token_ids)
        if not ids and self.tokenizer is not None:
            many = getattr(self.tokenizer, "eos_token_ids", None)
            one = getattr(self.tokenizer, "eos_token_id", None)
            ids = [int(i) for i in many] if many else ([int(one)] if one is not None else [])
        return ids

    # ------------------------------------------------------------------ scoring
    def _embed(
        self, input_ids: torch.Tensor, pixel_values, pixel_values_local, num_local_patches
    ) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        if self.vision is None:
            raise ValueError("image inputs given, but this checkpoint has no vision tower loaded")
        feats = self.vision.image_features(
            pixel_values.to(self.device, self.dtype),
            None if pixel_values_local is None else pixel_values_local.to(self.device, self.dtype),
            num_local_patches,
        ).to(embeds.dtype)
        mask = input_ids == self.config.image_token_id
        n = int(mask.sum())
        if n != feats.shape[0]:
            raise ValueError(
                f"image features and image tokens do not match: {n} tokens, {feats.shape[0]} features"
            )
        embeds = embeds.clone()
        embeds[mask] = feats
        return embeds

    @torch.inference_mode()
    def logits(
        self,
        input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        pixel_values: torch.Tensor | None = None,
        pixel_values_local: torch.Tensor | None = None,
        num_local_patches: list[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Float32 logits for every position: [T, vocab] for a 1-D sequence, [B, T, vocab] for 2-D."""
        ids = torch.as_tensor(input_ids, dtype=torch.long, device=self.device)
        squeeze = ids.dim() == 1
        if squeeze:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be a non-empty 1-D or 2-D sequence of token ids, got shape {list(ids.shape)}"
            )
        self._check_ids(ids)
        embeds = self._embed(ids, pixel_values, pixel_values_local, num_local_patches)
        positions = torch.arange(ids.shape[1], device=self.device).expand(ids.shape[0], -1)
        out = self.model(embeds, uncached_meta(self.config.text, positions)).float()
        return out[0] if squeeze else out

    def _check_ids(self, ids: torch.Tensor) -> None:
        v = self.config.text.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            raise ValueError(f"token id out of range [0, {v}): min {int(ids.min())}, max {int(ids.max())}")

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        use_cache: bool = True,
        max_batch_size: int | None = None,
        images: Sequence[ImageInputs | None] | None = None,
        speculative: str | None = None,
        num_speculative_tokens: int | None = None,
    ) -> list[list[int]]:
        """New tokens for each prompt (a stop token, when hit, is the last one returned).

        stop_token_ids=None stops at the checkpoint's eos ids; pass [] to never stop early.
        images: optional, one entry per prompt: a dict with the `logits` image arguments (pixel_values,
        pixel_values_local, num_local_patches) for that prompt's `<im_patch>` tokens, or None.
        speculative / num_speculative_tokens: as in `from_pretrained`, for this call (None: the LLM's own,
        "off": plain); `last_speculation` then holds the call's counts.
        Runs through the serving core (`self.core`: paged KV cache, prefix cache, continuous batching with
        whatever else is running); each prompt samples from its own generator seeded with `seed`.
        use_cache=False recomputes every step without a cache (`generate_static`, the reference).
        """
        k = self._call_spec_k(speculative, num_speculative_tokens)
        if not use_cache:
            return self.generate_static(
                prompts,
                max_new_tokens,
                temperature,
                top_p,
                seed,
                stop_token_ids,
                use_cache,
                max_batch_size,
                images,
                speculative="off",
            )
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"generate: {len(images)} image entries for {len(prompts)} prompts")
        for p in prompts:
            self._check_ids(torch.as_tensor(list(p), dtype=torch.long))
        params = self._params(max_new_tokens, temperature, top_p, seed, stop_token_ids, k)
        seqs = self.core.generate(prompts, [params] * len(prompts), images)
        if k:
            self.last_speculation = SpeculationStats.of(k, seqs)
        return [s.output for s in seqs]

    @property
    def speculative_tokens(self) -> int:
        """Drafts per verify step this LLM decodes with by default (0: plain decoding)."""
        return self._call_spec_k(None, None)

    def _params(self, max_new_tokens, temperature, top_p, seed, stop_token_ids, k: int = 0):
        from advisor.engine.serving.sequence import SamplingParams

        stops = tuple(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        return SamplingParams(max(0, max_new_tokens), temperature, top_p, seed, stops, k)

    @property
    def core(self):
        """The serving core every `generate` and `stream` runs on (made on first use with the default
        `ServingConfig`; assign an `advisor.engine.serving.EngineCore` to configure it)."""
        if self._core is None:
            from advisor.engine.serving.core import EngineCore, ServingConfig

            self._core = EngineCore(self, ServingConfig(max_num_seqs=self.max_batch_size))
        return self._core

    @core.setter
    def core(self, value) -> None:
        self._core = value

    def generate_static(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        use_cache: bool = True,
        max_batch_size: int | None = None,
        images: Sequence[ImageInputs | None] | None = None,
        speculative: str | None = None,
        num_speculative_tokens: int | None = None,
    ) -> list[list[int]]:
        """`generate` as it ran before the serving core: left-padded static batches of `max_batch_size`,
        one static KV cache each, one generator for the batch. Kept for `advisor.engine.bench_serving`'s comparison
        and as the reference the paged core is tested against (use_cache=False: no cache at all).

        stop_token_ids=None stops at the checkpoint's eos ids; pass [] to never stop early.
        images: optional, one entry per prompt: a dict with the `logits` image arguments (pixel_values,
        pixel_values_local, num_local_patches) for that prompt's `<im_patch>` tokens, or None.
        """
        if not prompts:
            return []
        if any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token")
        if images is not None and len(images) != len(prompts):
            raise ValueError(f"generate: {len(images)} image entries for {len(prompts)} prompts")
        stops = set(self.eos_token_ids if stop_token_ids is None else stop_token_ids)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        k = (
            self._call_spec_k(speculative, num_speculative_tokens) if use_cache else 0
        )  # uncached: the reference
        bs = max_batch_size or self.max_batch_size
        out: list[list[int]] = []
        for i in range(0, len(prompts), bs):
            batch = [list(p) for p in prompts[i : i + bs]]
            imgs = list(images[i : i + bs]) if images is not None else [None] * len(batch)
            out.extend(
                self._generate_batch(
                    batch, imgs, max_new_tokens, temperature, top_p, gen, stops, use_cache, k
                )
            )
        return out

    def _prompt_embeds(
        self, ids: torch.Tensor, lens: list[int], images: list[ImageInputs | None]
    ) -> torch.Tensor:
        """Token embeddings of a left-padded batch, with each prompt's image features in place."""
        embeds = self.model.embed_tokens(ids)
        T = ids.shape[1]
        for b, img in enumerate(images):
            if img:
                row = ids[b : b + 1, T - lens[b] :]
                embeds[b, T - lens[b] :] = self._embed(
                    row, img.get("pixel_values"), img.get("pixel_values_local"), img.get("num_local_patches")
                )[0]
        return embeds

    def stream(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
        images: ImageInputs | None = None,
        speculative: str | None = None,
        num_speculative_tokens: int | None = None,
    ) -> Iterator[int]:
        """Yield one prompt's new tokens as they are decoded (same rules as `generate`), through the
        serving core; leaving the loop early cancels the request. With speculation (as in `generate`),
        each verify step's accepted tokens come at once."""
        if len(prompt) == 0:
            raise ValueError("stream: the prompt needs at least one token")
        self._check_ids(torch.as_tensor(list(prompt), dtype=torch.long))
        k = self._call_spec_k(speculative, num_speculative_tokens)
        core = self.core
        seq = core.submit(
            prompt, self._params(max_new_tokens, temperature, top_p, seed, stop_token_ids, k), images
        )
        if k:
            self.last_speculation = SpeculationStats.of(k, [seq])
        sent = 0
        try:
            while True:
                core.drive(lambda n=sent: seq.finished or len(seq.output) > n)
                while sent < len(seq.output):
                    sent += 1
                    yield seq.output[sent - 1]
                if seq.finished:
                    if seq.finish_reason == "error":
                        raise RuntimeError(seq.error)
                    return
        finally:
            if not seq.finished:
                core.abort(seq)
                core.drive(lambda: seq.finished)

    def _generate_batch(self, prompts, images, max_new, temperature, top_p, gen, stops, use_cache, k=0):
        results: list[list[int]] = [[] for _ in prompts]
        if k:
            for step in self._decode_speculative(prompts, images, max_new, temperature, top_p, gen, stops, k):
                for row, toks in zip(results, step, strict=True):
                    row.extend(toks)
            return results
        done = [False] * len(prompts)
        for step in self._decode(prompts, images, max_new, temperature, top_p, gen, stops, use_cache):
            for b, t in enumerate(step):
                if not done[b]:
                    results[b].append(t)
                    done[b] = t in stops
        return results

    def _decode(
        self, prompts, images, max_new, temperature, top_p, gen, stops, use_cache
    ) -> Iterator[list[int]]:
        """Yield each step's sampled token for every row, until all rows hit a stop token or max_new."""
        if max_new <= 0:
            return
        with torch.inference_mode():
            B = len(prompts)
            lens_list = [len(p) for p in prompts]
            lens = torch.tensor(lens_list, device=self.device)
            T = max(lens_list)
            pad = self.config.text.pad_token_id or 0
            ids = torch.full((B, T), pad, dtype=torch.long, device=self.device)
            for b, p in enumerate(prompts):
                ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
            self._check_ids(ids)
            positions = torch.arange(T, device=self.device)[None] - (T - lens)[:, None]
            positions = positions.masked_fill(positions < 0, -1)
            embeds = self._prompt_embeds(ids, lens_list, images)
            if use_cache:
                cache = KVCache(self.config.text, B, T + max_new, self.dtype, self.device)
                logits = self.model(embeds, cache.plan(positions), cache, last_only=True)
            else:  # recompute the whole sequence every step (the reference the cache is tested against)
                seq_pos = positions
                logits = self.model(embeds, uncached_meta(self.config.text, seq_pos), last_only=True)
        done = [False] * B
        for step in range(max_new):
            with torch.inference_mode():
                nxt = sample(logits[:, -1].float(), temperature, top_p, gen)
            tokens = nxt.tolist()
            yield tokens
            done = [d or t in stops for d, t in zip(done, tokens, strict=True)]
            if all(done) or step == max_new - 1:
                return
            with torch.inference_mode():
                pos = (lens + step)[:, None]
                new = self.model.embed_tokens(nxt[:, None])
                if use_cache:
                    logits = self.model(new, cache.plan(pos), cache, last_only=True)
                else:
                    embeds, seq_pos = torch.cat([embeds, new], 1), torch.cat([seq_pos, pos], 1)
                    logits = self.model(embeds, uncached_meta(self.config.text, seq_pos), last_only=True)

    def _prefill(self, prompts, images, max_len: int, spare: int = 0):
        """A left-padded batch through the model into a fresh static cache of `max_len` more columns:
        (cache, logits [B, V] at each row's last token, hidden [B, T, H])."""
        B = len(prompts)
        lens_list = [len(p) for p in prompts]
        lens = torch.tensor(lens_list, device=self.device)
        T = max(lens_list)
        pad = self.config.text.pad_token_id or 0
        ids = torch.full((B, T), pad, dtype=torch.long, device=self.device)
        for b, p in enumerate(prompts):
            ids[b, T - len(p) :] = torch.tensor(p, dtype=torch.long)
        self._check_ids(ids)
        positions = torch.arange(T, device=self.device)[None] - (T - lens)[:, None]
        positions = positions.masked_fill(positions < 0, -1)
        embeds = self._prompt_embeds(ids, lens_list, images)
        cache = KVCache(self.config.text, B, T + max_len, self.dtype, self.device, spare=spare)
        logits, hidden = self.model(embeds, cache.plan(positions), cache, last_only=True, hidden=True)
        return cache, logits[:, -1], hidden

    def _decode_speculative(self, prompts, images, max_new, temperature, top_p, gen, stops, k):
        """Each round's new tokens per row ([] for finished rows), the MTP layers drafting k tokens per
        verify step (`advisor.engine.model.speculative`); stop tokens and max_new cut a row's last round."""
        if max_new <= 0:
            return
        with torch.inference_mode():
            # A frozen row (done) may stand k past the others' last verify and still receives the k + 1
            # columns of each later one before they are taken back.
            cache, logits, hidden = self._prefill(prompts, images, max_new + 2 * k + 1, spare=k)
            dec = SpeculativeDecoder(self.model, cache, k, temperature, top_p, gen)
            first = dec.start(prompts, logits, hidden)
        self.last_speculation = dec
        count = [1] * len(prompts)
        for b, t in enumerate(first):
            if t in stops or max_new == 1:
                dec.stop(b)
        yield [[t] for t in first]
        while any(dec.active):
            with torch.inference_mode():
                step = dec.step()
            for b, toks in enumerate(step):
                toks = toks[: max_new - count[b]]
                for i, t in enumerate(toks):
                    if t in stops:
                        toks = toks[: i + 1]
                        break
                step[b] = toks
                count[b] += len(toks)
                if toks and (toks[-1] in stops or count[b] >= max_new):
                    dec.stop(b)
            yield step


class SpeculationStats:
    """A speculative call's counts, summed over its sequences (read when the call is done)."""

    def __init__(self, k: int, seqs) -> None:
        self.k, self._seqs = k, list(seqs)

    @classmethod
    def of(cls, k: int, seqs) -> SpeculationStats:
        return cls(k, seqs)

    @property
    def row_steps(self) -> int:
        """Verify steps, all sequences."""
        return sum(s.spec.steps for s in self._seqs if s.spec is not None)

    @property
    def accepted(self) -> int:
        """Drafts accepted, all sequences."""
        return sum(s.spec.accepted for s in self._seqs if s.spec is not None)

    @property
    def steps(self) -> int:
        """Verify steps of the longest-running sequence."""
        return max((s.spec.steps for s in self._seqs if s.spec is not None), default=0)


def _load_vision(cfg: ModelConfig, ckpt: Checkpoint, dtype: torch.dtype, device: torch.device):
    """The vision tower + projector (advisor.engine.model.vision), when the checkpoint has one; with the keys it used."""
    if cfg.vision is None or not any(k.startswith(_VISION_PREFIXES) for k in ckpt.keys()):
        return None, set()
    try:
        from advisor.engine.model.vision import build_vision, vision_keys
    except ImportError:
        log.warning(
            "checkpoint has a vision tower but advisor.engine.model.vision is unavailable; images are disabled"
        )
        return None, set()
    vision = build_vision(cfg.vision, cfg.text.hidden_size, cfg.projector_bias, device="meta", dtype=dtype)
    spec = {}
    for name, shape in vision_keys(vision).items():
        key = name
        top_level = name.removeprefix("vision_model.")  # some exports keep the downsamplers at the top
        if key not in ckpt.shapes and top_level.startswith("vit_downsampler") and top_level in ckpt.shapes:
            key = top_level
        spec[name] = ([(key, shape)], 0)
    used = load_spec(vision, spec, ckpt, dtype, device, fp32_params=())
    return vision.eval(), used


def _load_tokenizer(path: Path):
    """advisor.engine.text.tokenizer's loader when present, else the raw `tokenizers` tokenizer; None without tokenizer.json."""
    if not (path / "tokenizer.json").exists():
        return None
    try:
        from advisor.engine.text import tokenizer as tok_mod
    except ImportError:
        tok_mod = None
    if tok_mod is not None:
        loaders = [getattr(tok_mod, n, None) for n in ("load_tokenizer", "from_pretrained")]
        loaders += [
            getattr(getattr(tok_mod, c, None), "from_pretrained", None)
            for c in ("StepTokenizer", "Tokenizer")
        ]
        for fn in loaders:
            if callable(fn):
                try:
                    return fn(path)
                except Exception as e:  # a tokenizer problem must not make the weights unusable
                    log.warning(
                        "advisor.engine.text.tokenizer could not load %s (%s); using the raw tokenizer.json", path, e
                    )
                break
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json"))
