"""The project tokenizer: byte-level BPE trained on the rendered training traces, with every Step marker.

Built by `advisor.engine.text.tokenizer.build_step_tokenizer` (markers get fixed ids 0..N-1, chat markers stay
non-special so decoding keeps reasoning and tool calls). The markers are cut out of the corpus before
training so that no merge is spent on pieces of `<|im_start|>` and friends. Digits are single tokens by
default (`digit_group=1`); with `digit_group=3` a number is groups of up to three digits, each one token.
Copying digit by digit, the trained models kept a number's digits but not their order ("937.83" came out
as "383.83"); in groups a copy is a few tokens that rarely repeat, but each group is rare in the data, and
in the runs so far groups were copied worse (training/README.md). Newlines are single tokens: a
turn without reasoning then encodes the same as a prompt plus its target (`training.traces.packed`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from advisor.engine.text.tokenizer import STEP_SPECIAL_TOKENS, StepTokenizer, build_step_tokenizer

from training.traces import Sample

_MARKERS = re.compile("|".join(re.escape(t) for t in sorted(STEP_SPECIAL_TOKENS, key=len, reverse=True)))


def corpus(samples: Iterable[Sample]) -> Iterable[str]:
    """Each rendered sample once, split at the markers."""
    for s in samples:
        for piece in _MARKERS.split(s.prompt + s.target):
            if piece:
                yield piece


def build_project_tokenizer(
    out_dir: Path, samples: Iterable[Sample], vocab_size: int = 2048, digit_group: int = 1
) -> StepTokenizer:
    return build_step_tokenizer(
        out_dir,
        list(corpus(samples)),
        vocab_size=vocab_size,
        digit_group=digit_group,
        split_newlines=True,
    )
