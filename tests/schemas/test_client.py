from schemas import TokenChunk
from schemas.client import ReplyAssembler


def chunk(seq: int, *, attempt: int = 1, worker: str = "w1", last: bool = False) -> TokenChunk:
    return TokenChunk(
        request_id="r", seq=seq, attempt=attempt, text=f"{worker}:{seq} ",
        finish_reason="stop" if last else None, submitted_at=1, emitted_at=2,
        worker_id=worker, warm=True,
    )


def seqs(chunks: list[TokenChunk]) -> list[int]:
    return [c.seq for c in chunks]


def test_orders_by_seq_and_drops_duplicates():
    a = ReplyAssembler()
    assert seqs(a.add(chunk(0))) == [0]
    assert seqs(a.add(chunk(2))) == []
    assert seqs(a.add(chunk(1))) == [1, 2]
    assert seqs(a.add(chunk(1))) == []
    assert seqs(a.add(chunk(3, last=True))) == [3]
    assert a.done and a.duplicates == 1
    assert a.add(chunk(3, last=True)) == [] and a.duplicates == 2


def test_a_new_worker_restarting_at_seq_0_replaces_the_dead_one():
    a = ReplyAssembler()
    a.add(chunk(0, worker="dead"))
    a.add(chunk(1, worker="dead"))
    restarted = a.add(chunk(0, worker="next"))
    assert seqs(restarted) == [0] and a.restarts == 1
    assert a.add(chunk(2, worker="dead")) == [], "the replaced stream is dropped"
    assert seqs(a.add(chunk(1, worker="next", last=True))) == [1]
    assert a.done


def test_an_older_attempt_never_replaces_a_newer_one():
    a = ReplyAssembler()
    a.add(chunk(0, attempt=2, worker="b"))
    assert a.add(chunk(0, attempt=1, worker="a")) == []
    assert a.restarts == 0 and a.stream == (2, "b")
