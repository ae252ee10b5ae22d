"""What a client sees of a sequence's tokens: text released as it becomes final (an incomplete UTF-8
character, or a tail that could be the start of a stop string, is held back), cut before the first stop
string, and log-probabilities in the OpenAI shapes (chat's `logprobs.content`, the legacy completions'
`tokens` / `token_logprobs` / `top_logprobs` / `text_offset`)."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

from advisor.engine.serving.sequence import TokenLogprobs
from advisor.engine.text.chat_parse import held_suffix


class Detokenizer:
    """Text deltas from a growing list of ids, holding back an incomplete UTF-8 character. Each token
    decodes only a short window (the ids since the last released text, and the few before them for
    context, as vLLM's incremental detokenizer does), so a long reply costs linear time, not quadratic."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.prefix = 0  # start of the context window
        self.read = 0  # ids up to here have been released as text

    def add(self, token: int) -> str:
        self.ids.append(token)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is held back, at the end of the sequence."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        text = self.tokenizer.decode(self.ids[self.prefix :])
        if not final and (len(text) <= len(before) or text.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before) :]


class TextOutput:
    """One choice's visible text. `add` takes each generated token and returns the text that is final;
    once a stop string appears, `stopped` is set, the text ends just before it and later tokens are
    ignored. `num_tokens` counts the tokens up to and including the one that completed the stop string
    (the choice's completion tokens, as vLLM counts them)."""

    def __init__(self, tokenizer, stop_token_ids: Seq[int] = (), stop: Seq[str] = ()):
        self.detok = Detokenizer(tokenizer)
        self.stop_token_ids, self.stop = frozenset(stop_token_ids), tuple(stop)
        self.pending = ""  # decoded, not yet released: could be the start of a stop string
        self.num_tokens = 0
        self.stopped = False

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.num_tokens += 1
        if token in self.stop_token_ids:
            return ""
        self.pending += self.detok.add(token)
        return self._release()

    def flush(self) -> str:
        """The held-back text, once the sequence has ended by itself (no stop string followed)."""
        if self.stopped:
            return ""
        self.pending += self.detok.flush()
        return self._release(final=True)

    def _release(self, final: bool = False) -> str:
        text = self.pending
        if not self.stop:
            self.pending = ""
            return text
        # The released text never ends in a stop string's prefix, so a stop can only start in `pending`.
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped, self.pending = True, ""
            return text[: min(hits)]
        keep = 0 if final else held_suffix(text, self.stop)
        self.pending = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]


# ------------------------------------------------------------------------------------ log-probabilities
def _token_text(tokenizer, token: int) -> str:
    """A token as text (as vLLM reports it): a piece of a multi-byte character shows as U+FFFD."""
    return tokenizer.decode([token])


def _byte_level_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's printable stand-ins for the 256 bytes), inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    stand_ins, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, stand_ins, strict=True)}


_BYTE_LEVEL = _byte_level_decoder()


def _token_bytes(tokenizer, token: int, text: str) -> list[int]:
    """The token's own UTF-8 bytes (chat's `bytes`): for a piece of a character, read from its byte-level
    vocabulary entry, so that concatenating the pieces' bytes gives the character."""
    if "\ufffd" in text:
        piece = tokenizer.id_to_token(token) if hasattr(tokenizer, "id_to_token") else None
        if piece and all(ch in _BYTE_LEVEL for ch in piece):
            return [_BYTE_LEVEL[ch] for ch in piece]
    return list(text.encode("utf-8"))


def chat_logprobs(tokenizer, items: Seq[tuple[int, TokenLogprobs]]) -> list[dict[str, Any]]:
    """Chat's `logprobs.content` entries: one per token, with its `top_logprobs` (the k most likely)."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": _token_bytes(tokenizer, token, text)}

    out = []
    for token, lp in items:
        e = entry(token, lp.logprob)
        e["top_logprobs"] = [entry(t, v) for t, v in lp.top]
        out.append(e)
    return out


class CompletionLogprobs:
    """The legacy completions' `logprobs` object, built token by token (`text_offset` runs on across the
    chunks of a stream). `top_logprobs` holds the k most likely and the sampled token, as vLLM sends it."""

    def __init__(self, tokenizer):
        self.tokenizer, self.offset = tokenizer, 0

    def take(self, items: Seq[tuple[int, TokenLogprobs]]) -> dict[str, list]:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp in items:
            text = _token_text(self.tokenizer, token)
            top = {_token_text(self.tokenizer, t): v for t, v in lp.top}
            top.setdefault(text, lp.logprob)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp.logprob)
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out
