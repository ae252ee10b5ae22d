"""The Step tokenizer: `tokenizer.json` (BPE, via the `tokenizers` library) + `tokenizer_config.json`.

`StepTokenizer` encodes rendered chat text (the chat-format markers are added tokens, matched as single
ids wherever they appear), decodes, and knows the special ids the engine and the chat parser need.
`build_step_tokenizer` trains a small byte-level BPE with every Step marker and writes it in the hub
layout (`tokenizer.json`, `tokenizer_config.json` with the chat template), which `transformers`'
`PreTrainedTokenizerFast` also loads: tests use it for tiny checkpoints, and the project tokenizer is
trained with it later.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "CHAT_MARKERS",
    "IMAGE_MARKERS",
    "STEP_SPECIAL_TOKENS",
    "StepTokenizer",
    "TokenizerError",
    "build_step_tokenizer",
    "load_tokenizer",
]


class TokenizerError(ValueError):
    """A tokenizer directory that cannot be used; the message names the file and the problem."""


# Control tokens: `special` in tokenizer_config.json, dropped by decode(skip_special_tokens=True).
CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# The image layout (see advisor.engine.text.chat.image_token_layout); special as well.
IMAGE_MARKERS = ("<im_patch>", "<im_start>", "<im_end>", "<patch_start>", "<patch_end>", "<patch_newline>")
# Markers the chat parser reads back out of generated text: single ids, but not `special`, so that
# a decode which skips special tokens still shows reasoning and tool calls.
CHAT_MARKERS = (
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)
STEP_SPECIAL_TOKENS = CONTROL_TOKENS + IMAGE_MARKERS + CHAT_MARKERS

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class _Added:
    content: str
    special: bool


class StepTokenizer:
    """A loaded Step tokenizer. `config` is tokenizer_config.json as a dict ({} when absent)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        config: Mapping[str, Any] | None = None,
        path: Path | None = None,
        chat_template: str | None = None,
    ):
        self.tokenizer = tokenizer
        self.config = dict(config or {})
        self.path = path
        self._chat_template_source = chat_template
        self._compiled_template: Any = None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path) -> StepTokenizer:
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json")
        try:
            tok = Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise TokenizerError(
                f"{tok_file}: cannot load ({str(e).splitlines()[0] if str(e) else e!r})"
            ) from None
        cfg: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            try:
                cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{cfg_file}: not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise TokenizerError(f"{cfg_file}: expected a JSON object")
        template = None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        else:
            template = _template_from_config(cfg)
        return cls(tok, cfg, path, template)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (the embedding table must be at least this big)."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(token_id)

    def require_id(self, token: str) -> int:
        tid = self.token_to_id(token)
        if tid is None:
            where = self.path / "tokenizer.json" if self.path else "tokenizer"
            raise TokenizerError(f"{where}: no token {token!r}")
        return tid

    @property
    def special_ids(self) -> dict[str, int]:
        """Ids of the Step markers this vocabulary has (a real checkpoint may lack some)."""
        out = {}
        for t in STEP_SPECIAL_TOKENS:
            tid = self.token_to_id(t)
            if tid is not None:
                out[t] = tid
        return out

    @property
    def eos_token(self) -> str:
        eos = self.config.get("eos_token")
        if isinstance(eos, Mapping):  # {"content": "<|im_end|>", ...} in older configs
            eos = eos.get("content")
        return eos if isinstance(eos, str) and eos else EOS_TOKEN

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends an assistant turn: the configured eos and `<|im_end|>`."""
        ids = []
        for t in (self.eos_token, EOS_TOKEN):
            tid = self.token_to_id(t)
            if tid is not None and tid not in ids:
                ids.append(tid)
        return ids

    @property
    def pad_token_id(self) -> int | None:
        pad = self.config.get("pad_token")
        if isinstance(pad, Mapping):
            pad = pad.get("content")
        return self.token_to_id(pad) if isinstance(pad, str) else None

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        """Ids of `text`; chat markers in it become their single ids. Nothing is prepended."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def count(self, text: str) -> int:
        return len(self.encode(text)) if text else 0

    # ------------------------------------------------------------------ chat
    @property
    def chat_template(self) -> str | None:
        """The template source this tokenizer ships (chat_template.jinja or tokenizer_config.json), or None."""
        return self._chat_template_source

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        *,
        effort: str | None = None,
        add_generation_prompt: bool = True,
        tokenize: bool = True,
    ) -> list[int] | str:
        """Render with the shipped template (else the engine's default Step template), then encode."""
        from advisor.engine.text.chat import ChatTemplate

        if self._compiled_template is None:
            if self._chat_template_source is not None:
                origin = str(self.path) if self.path else "tokenizer"
                self._compiled_template = ChatTemplate(self._chat_template_source, origin)
            else:
                self._compiled_template = ChatTemplate.default()
        text = self._compiled_template.render(
            messages, tools, effort=effort, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return f"StepTokenizer(path={str(self.path)!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str | Path) -> StepTokenizer:
    """The tokenizer of a checkpoint directory (what `engine.LLM.from_pretrained` attaches as `llm.tokenizer`)."""
    return StepTokenizer.from_pretrained(path)


def _template_from_config(cfg: Mapping[str, Any]) -> str | None:
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": "..."}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, Mapping)}
        tpl = named.get("default") or next(iter(named.values()), None)
    return tpl if isinstance(tpl, str) and tpl.strip() else None


# ---------------------------------------------------------------------------------------- building
_BUILTIN_CORPUS = (
    "The quick brown fox jumps over the lazy dog. What is the total on the receipt? 42.17",
    "Let me look at the image first, then crop the table and read the numbers row by row.",
    'def add(a: int, b: int) -> int:\n    """Add two numbers."""\n    return a + b\n',
    '{"type": "function", "function": {"name": "crop", "parameters": {"type": "object", '
    '"properties": {"x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]}}}',
    "<function=python>\n<parameter=code>\nprint(sum([1, 2, 3]))\n</parameter>\n</function>",
    "Reasoning: low\nReasoning: medium\nReasoning: high\n# Tools\nsystem user assistant tool_response",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 -7 1e-5; punctuation ,.;:!?()[]{}<>/\\|'\"`~@#$%^&*-_=+",
    "Der schnelle braune Fuchs. Le renard brun rapide. 敏捷的棕色狐狸。Быстрая бурая лиса.",
)


def build_step_tokenizer(
    out_dir: str | Path,
    corpus: Iterable[str] | None = None,
    *,
    vocab_size: int = 1024,
    chat_template: str | None = None,
    model_max_length: int = 262144,
    split_digits: bool = False,
    digit_group: int = 0,
    split_newlines: bool = False,
) -> StepTokenizer:
    """Train a byte-level BPE with every Step marker and save it in the hub layout in `out_dir`.

    Writes `tokenizer.json` and `tokenizer_config.json` (tokenizer_class PreTrainedTokenizerFast, eos
    `<|im_end|>`, pad `<|endoftext|>`, `added_tokens_decoder`, and `chat_template`: the given Jinja2
    source, or the engine's default Step template). Byte-level means any text encodes, never an unk.
    `split_digits` makes every digit its own token (no merges across digits), which small models need to
    copy and compare numbers digit by digit (the same as `digit_group=1`). `digit_group` N > 1 cuts every
    run of digits into groups of up to N from the left (as the cl100k and Llama 3 tokenizers do with
    N = 3) and puts every group in the vocabulary (on top of `vocab_size`): a number is then the same ids
    wherever it appears, and a copy of it is a few tokens that rarely repeat, not a string of ten digits to
    keep in order. `split_newlines` makes every newline its own token, so that `<think>\n` + `\n</think>`
    (a prompt, then what the model writes) encodes as the same ids as the `<think>\n\n</think>` the chat
    template renders for that turn in later prompts.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    texts = list(corpus) if corpus is not None else list(_BUILTIN_CORPUS)
    # The markers themselves in context, so that the text around them gets merges too.
    texts += [f"<|im_start|>user\n{t}<|im_end|>\n" for t in texts[:4]]

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    splits = []
    if split_newlines:
        splits.append(pre_tokenizers.Split("\n", behavior="isolated"))
    if split_digits or digit_group == 1:
        splits.append(pre_tokenizers.Digits(individual_digits=True))
    elif digit_group > 1:
        splits.append(pre_tokenizers.Split(Regex(rf"\d{{1,{digit_group}}}"), behavior="isolated"))
        # every group, so that no number falls back to smaller pieces for want of a merge
        groups = [[f"{i:0{n}d}" for i in range(10**n)] for n in range(2, digit_group + 1)]
        texts += [" ".join(g) for g in groups]
        vocab_size += sum(len(g) for g in groups)
    tok.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level]) if splits else byte_level
    tok.decoder = decoders.ByteLevel()
    added = [_Added(t, True) for t in CONTROL_TOKENS + IMAGE_MARKERS] + [
        _Added(t, False) for t in CHAT_MARKERS
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size, 256 + len(added)),
        # Ids 0..N-1 go to the markers, in a fixed order, whatever the corpus.
        special_tokens=[AddedToken(a.content, special=a.special, normalized=False) for a in added],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The trainer registers its tokens as special; re-declare the chat markers as plain added tokens.
    tok.add_tokens([AddedToken(a.content, special=False, normalized=False) for a in added if not a.special])
    tok.save(str(out / "tokenizer.json"))

    if chat_template is None:
        from advisor.engine.text.chat import DEFAULT_TEMPLATE_PATH

        chat_template = DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8")
    decoder = {}
    for a in added:
        tid = tok.token_to_id(a.content)
        decoder[str(tid)] = {
            "content": a.content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": a.special,
        }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
    }
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    return StepTokenizer.from_pretrained(out)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m advisor.engine.text.tokenizer OUT_DIR [TEXT_FILE ...] [--vocab-size N]`: train and save a Step tokenizer."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m advisor.engine.text.tokenizer", description=main.__doc__)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("corpus", nargs="*", type=Path, help="UTF-8 text files, one training text per line")
    ap.add_argument("--vocab-size", type=int, default=1024)
    args = ap.parse_args(argv)

    def lines():
        for f in args.corpus:
            with f.open(encoding="utf-8") as fh:
                yield from (line.rstrip("\n") for line in fh)

    missing = [str(f) for f in args.corpus if not f.is_file()]
    if missing:
        print(f"advisor.engine.text.tokenizer: corpus file not found: {', '.join(missing)}")
        return 2
    tok = build_step_tokenizer(args.out_dir, lines() if args.corpus else None, vocab_size=args.vocab_size)
    print(f"wrote {args.out_dir}/tokenizer.json and tokenizer_config.json ({tok.vocab_size} ids)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
