"""The serving core's bookkeeping without a model: block pool, prefix cache, block tables, scheduler."""

from __future__ import annotations

import pytest
from advisor.engine.serving.block_manager import BlockManager
from advisor.engine.serving.block_pool import BlockPool, PoolExhausted, block_key
from advisor.engine.serving.scheduler import Scheduler
from advisor.engine.serving.sequence import SamplingParams, Sequence, Status

FULL, SLIDING = "full_attention", "sliding_attention"


def seq(tokens, images=None, max_tokens=8) -> Sequence:
    return Sequence(list(tokens), SamplingParams(max_tokens=max_tokens), images)


def run_chunks(sched: Scheduler, chunks, token: int = 1) -> None:
    """What the engine does after a step: mark the chunk computed, cache its full blocks, append a token."""
    for c in chunks:
        c.seq.num_computed += c.n
        sched.blocks.commit(c.seq)
        if c.samples:
            c.seq.output.append(token)


# ---------------------------------------------------------------------------------------- pool
def test_pool_counts_references_and_keeps_released_cached_blocks_in_lru_order():
    pool = BlockPool(3, 4)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    with pytest.raises(PoolExhausted, match="3 blocks of 4 tokens"):
        pool.allocate()
    pool.register(a, b"ka")
    pool.register(b, b"kb")
    pool.take(a)  # shared by a second sequence
    pool.release(a)
    assert pool.num_available == 0  # still referenced once
    pool.release(a)
    pool.release(b)
    pool.release(c)  # never cached: free at once
    assert pool.num_available == 3 and pool.lookup(b"ka") == a
    assert pool.allocate() == c  # free blocks before evicting cached ones
    assert pool.allocate() == a  # then the least recently released cached block
    assert pool.lookup(b"ka") is None and pool.lookup(b"kb") == b
    pool.take(b)  # a hit on an unreferenced cached block takes it out of the LRU
    with pytest.raises(PoolExhausted):
        pool.allocate()
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(c)
        pool.release(c)


def test_block_keys_chain_the_whole_prefix_and_the_images():
    k1 = block_key(None, [1, 2, 3, 4])
    assert block_key(None, [1, 2, 3, 4]) == k1 != block_key(None, [1, 2, 3, 5])
    assert block_key(k1, [5, 6, 7, 8]) != block_key(block_key(None, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert block_key(k1, [5, 6, 7, 8], b"img") != block_key(k1, [5, 6, 7, 8])


# ---------------------------------------------------------------------------------------- prefix hits
def test_a_second_sequence_reuses_the_full_blocks_of_a_shared_prefix():
    bm = BlockManager({FULL: None}, 16, 4)
    a = seq(range(1, 11))  # 10 tokens: blocks [1-4] [5-8] [9-10]
    assert bm.admit(a, 10) and a.num_computed == 0
    a.num_computed = 10
    bm.commit(a)
    b = seq(list(range(1, 9)) + [50, 51, 52])  # shares two full blocks
    assert bm.admit(b, 11)
    assert b.num_computed == 8 and b.tables[FULL][:2] == a.tables[FULL][:2]
    pool = bm.pools[FULL]
    assert pool.blocks[a.tables[FULL][0]].ref == 2
    bm.free(a)
    bm.free(b)
    # after both finished, the blocks stay cached: a third request still hits them
    c = seq(list(range(1, 9)) + [7])
    assert bm.admit(c, 9) and c.num_computed == 8


def test_the_last_prompt_token_is_always_computed():
    bm = BlockManager({FULL: None}, 8, 4)
    a = seq(range(8))
    bm.admit(a, 8)
    a.num_computed = 8
    bm.commit(a)
    b = seq(range(8))  # the same 8 tokens: only the first block can be a hit
    bm.admit(b, 8)
    assert b.num_computed == 4


def test_images_are_part_of_the_key_from_their_first_token_on():
    img_a = {"pixel_values": [[1.0, 2.0]]}
    img_b = {"pixel_values": [[1.0, 3.0]]}
    prompt = [1, 2, 3, 4, 5, 9, 9, 9, 10, 11, 12, 13, 14]  # image token 9 in the second block
    bm = BlockManager({FULL: None}, 32, 4, image_token_id=9)
    a = seq(prompt, img_a)
    bm.admit(a, len(prompt))
    a.num_computed = len(prompt)
    bm.commit(a)
    other = seq(prompt, img_b)
    bm.admit(other, len(prompt))
    assert other.num_computed == 4  # the text block before the image is shared, nothing after it
    same = seq(prompt, {"pixel_values": [[1.0, 2.0]]})
    bm.admit(same, len(prompt))
    assert same.num_computed == 12
    text = seq(prompt)
    bm.admit(text, len(prompt))
    assert text.num_computed == 4


def test_sliding_blocks_leave_with_their_window_and_hits_need_only_the_window():
    bm = BlockManager({FULL: None, SLIDING: 6}, 32, 4)
    a = seq(range(1, 21))  # 20 tokens
    bm.admit(a, 20)
    a.num_computed = 20
    bm.commit(a)
    # the next query (position 20) sees positions 15..20: blocks 0-2 (positions 0-11) are gone
    assert a.tables[SLIDING][:3] == [None, None, None] and None not in a.tables[SLIDING][3:]
    assert None not in a.tables[FULL]
    assert bm.pools[SLIDING].num_in_use == 2 and bm.pools[FULL].num_in_use == 5
    bm.free(a)
    b = seq(list(range(1, 21)) + [99])
    assert bm.admit(b, 21)
    assert b.num_computed == 20  # the sliding blocks still cached cover the window before position 20
    assert b.tables[SLIDING][:3] == [None, None, None]


def test_a_hit_needs_the_sliding_window_cached_not_only_the_full_blocks():
    bm = BlockManager({FULL: None, SLIDING: 4}, 32, 4)
    a = seq(range(1, 17))
    bm.admit(a, 16)
    a.num_computed = 16
    bm.commit(a)
    bm.free(a)
    sliding = bm.pools[SLIDING]

    def evict_sliding_down_to(n):
        taken = []
        while sliding.num_cached() > n:
            taken.append(sliding.allocate())
        for b in taken:
            sliding.release(b)

    evict_sliding_down_to(1)  # only the block of positions 12-15 is left: all the window needs
    b = seq(list(range(1, 17)) + [5])
    bm.admit(b, 17)
    assert b.num_computed == 16
    bm.free(b)
    evict_sliding_down_to(0)
    c = seq(list(range(1, 17)) + [5])
    bm.admit(c, 17)
    assert c.num_computed == 0  # the full layers still have every block, the sliding ones none


# ---------------------------------------------------------------------------------------- scheduler
def scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=8) -> Scheduler:
    return Scheduler(BlockManager({FULL: None}, num_blocks, block_size), max_num_seqs, budget)


def test_prefill_is_chunked_and_decodes_run_beside_it():
    s = scheduler(budget=8)
    short = seq(range(1, 4))
    s.add(short)
    chunks = s.schedule()
    assert [(c.seq, c.start, c.n) for c in chunks] == [(short, 0, 3)]
    run_chunks(s, chunks)
    long = seq(range(100, 120))  # 20 tokens: chunks of at most 7 beside the decode
    s.add(long)
    seen = []
    while long.num_computed < 20:
        chunks = s.schedule()
        assert chunks[0].seq is short and chunks[0].n == 1  # the running decode is never held back
        assert sum(c.n for c in chunks) <= 8
        seen.append(chunks[1].n)
        run_chunks(s, chunks)
    assert seen == [7, 7, 6] and len(long.output) == 1


def test_requests_join_between_steps_up_to_max_num_seqs():
    s = scheduler(max_num_seqs=2, budget=64)
    a, b, c = seq([1, 2]), seq([3, 4]), seq([5, 6])
    for x in (a, b, c):
        s.add(x)
    chunks = s.schedule()
    assert [ch.seq for ch in chunks] == [a, b] and c.status is Status.WAITING
    run_chunks(s, chunks)
    s.finish(a, "stop")
    assert [ch.seq for ch in s.schedule()] == [b, c]


def test_pool_exhaustion_preempts_the_newest_and_frees_its_blocks():
    s = scheduler(num_blocks=4, block_size=4, budget=64)
    old, new = seq(range(1, 8)), seq(range(20, 27))  # 7 tokens each: 2 blocks each, the pool is full
    s.add(old)
    s.add(new)
    run_chunks(s, s.schedule())
    assert s.blocks.pools[FULL].num_available == 0
    # old now needs block 3 for its 9th token... after one more decode each
    run_chunks(s, s.schedule())  # positions 7: fits in block 2 of each
    chunks = s.schedule()  # position 8 needs a new block: new is preempted, old goes on
    assert [c.seq for c in chunks] == [old]
    assert new.status is Status.WAITING and new.num_computed == 0 and new.tables == {}
    assert s.waiting[0] is new and s.num_preemptions == 1
    run_chunks(s, chunks)
    s.finish(old, "length")
    chunks = s.schedule()  # recomputed from its prefix-cache hit: prompt + the token it had sampled
    assert chunks[0].seq is new and chunks[0].start == 4 and chunks[0].start + chunks[0].n == 9


def test_finishing_or_cancelling_frees_blocks_at_once():
    s = scheduler(budget=64)
    a = seq(range(1, 10))
    s.add(a)
    run_chunks(s, s.schedule())
    pool = s.blocks.pools[FULL]
    assert pool.num_in_use == 3
    s.finish(a, "abort")
    assert pool.num_in_use == 0 and a.status is Status.FINISHED and a.finish_reason == "abort"
    assert not s.has_work()


def test_a_sequence_too_big_for_the_whole_pool_is_rejected_not_looped_on():
    s = scheduler(num_blocks=2, block_size=4, budget=64)
    big, small = seq(range(1, 12)), seq([1, 2])
    s.add(big)
    s.add(small)
    chunks = s.schedule()
    assert [c.seq for c in chunks] == [small]
    assert s.rejected == [big] and big.finish_reason == "error" and "does not fit the KV pool" in big.error
