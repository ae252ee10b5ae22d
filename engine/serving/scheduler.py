"""Continuous batching: which sequences run in the next step, and how many of their tokens.

Every step has a token budget (`max_num_batched_tokens`). Running sequences go first, oldest first:
a decoding one needs one token, one still prefilling gets the next chunk of its prompt, so a long
prompt holds the running decodes back by at most one chunk. Waiting sequences join, in arrival order,
while there is budget, a free row (`max_num_seqs`) and room in the pool; each starts from its longest
cached prefix. When a running sequence needs a block and the pool has none, the newest running
sequence is preempted: its blocks go back (the full ones stay in the prefix cache) and it waits at the
head of the queue to be recomputed, which never changes what it generates.

A speculating sequence in decode runs its last token and its drafts (`ScheduledChunk.drafts`): 1 + k
tokens of the budget and their blocks; the core hands back the rejected drafts' blocks after the step.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from advisor.engine.serving.block_manager import BlockManager
from advisor.engine.serving.sequence import Sequence, Status


@dataclass
class ScheduledChunk:
    seq: Sequence
    start: int  # first position computed in this step
    n: int  # tokens computed in this step (with the drafts)
    drafts: list[int] = field(default_factory=list)  # MTP drafts verified after the last token

    @property
    def samples(self) -> bool:
        """Whether this chunk ends at the sequence's last token (its logits give the next token)."""
        return self.start + self.n - len(self.drafts) == self.seq.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int = 64, max_num_batched_tokens: int = 512):
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be positive")
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order: the last one is the newest
        self.num_preemptions = 0
        self.rejected: list[Sequence] = []  # finished with an error by `schedule`; the caller reports them

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            left = seq.num_tokens - seq.num_computed
            drafts = seq.spec.drafts if seq.spec is not None and left == 1 else []
            n = min(left + len(drafts), budget)
            drafts = drafts[: max(0, n - left)]
            while not self.blocks.can_allocate(seq, n):
                victim = self._newest_unscheduled(scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, n)
                chunks.append(ScheduledChunk(seq, seq.num_computed, n, list(drafts)))
                scheduled.add(seq.id)
                budget -= n
                i += 1
                continue
            # seq itself was preempted: the list shifted, i already points at the next one
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.admit(seq, budget):
                if self.running or chunks:
                    break  # it fits once others finish
                self.waiting.popleft()  # alone in the pool and still too big: it never fits
                seq.error = self._too_big(seq)
                self.finish(seq, "error")
                self.rejected.append(seq)
                continue
            self.waiting.popleft()
            if not seq.admitted:
                seq.admitted = True
                seq.num_cached_prompt = min(seq.num_computed, len(seq.prompt))
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed, n))
            scheduled.add(seq.id)
            budget -= n
        return chunks

    def _newest_unscheduled(self, scheduled: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if seq.id not in scheduled:
                return seq
        raise AssertionError("a scheduled sequence is always unscheduled when it asks for blocks")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        if seq.spec is not None:
            seq.spec.reset(0)
        seq.preemptions += 1
        self.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _too_big(self, seq: Sequence) -> str:
        pools = self.blocks.pools
        size = next(iter(pools.values()))
        return (
            f"a {seq.num_tokens}-token sequence does not fit the KV pool alone "
            f"({size.num_blocks} blocks of {size.block_size} tokens)"
        )

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence (stop, length, abort): its blocks go back at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
