from gpu_worker.delivery import ChunkBatcher, ChunkPolicy, OffsetTracker


def test_commit_waits_for_the_oldest_unfinished_record():
    t = OffsetTracker()
    for off in (10, 11, 12):
        t.consumed(off)
    assert t.committable() == 10
    t.mark_committed(10)
    t.done(11)
    t.done(12)
    assert t.committable() is None  # 10 still running: nothing new is safe
    t.done(10)
    assert t.committable() == 13
    t.mark_committed(13)
    assert t.committable() is None


def test_skipped_records_advance_the_commit_when_nothing_is_open():
    t = OffsetTracker()
    t.skipped(0)
    t.skipped(1)
    assert t.committable() == 2
    t.consumed(2)
    t.skipped(3)
    assert t.committable() == 2
    t.done(2)
    assert t.committable() == 4


def test_first_token_goes_out_at_once_then_chunks_by_count():
    b = ChunkBatcher(ChunkPolicy(max_tokens=3, max_delay_ms=1000))
    first = b.add("r", "a", [1], now_ms=0)
    assert first is not None and first.seq == 0 and first.token_ids == [1]
    assert b.add("r", "b", [2], now_ms=1) is None
    assert b.add("r", "c", [3], now_ms=2) is None
    second = b.add("r", "d", [4], now_ms=3)
    assert second is not None and (second.seq, second.text, second.token_ids) == (1, "bcd", [2, 3, 4])
    last = b.finish("r", "stop")
    assert (last.seq, last.text, last.token_ids, last.finish_reason) == (2, "", [], "stop")


def test_pending_tokens_flush_after_the_delay():
    b = ChunkBatcher(ChunkPolicy(max_tokens=100, max_delay_ms=50))
    b.add("r", "x", [1], now_ms=0)
    b.add("r", "y", [2], now_ms=10)
    assert b.next_deadline_ms() == 60
    assert b.due(now_ms=59) == []
    [chunk] = b.due(now_ms=60)
    assert (chunk.seq, chunk.text) == (1, "y")
    assert b.next_deadline_ms() is None


def test_sequence_numbers_are_per_request():
    b = ChunkBatcher(ChunkPolicy())
    assert b.add("a", "1", [1], 0).seq == 0
    assert b.add("b", "1", [1], 0).seq == 0
    assert b.finish("a", "length").seq == 1
    assert b.finish("b", "stop").seq == 1
