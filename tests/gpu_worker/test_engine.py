"""The engine end to end on CPU: fake models first, then the real tiny checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gpu_worker.engine import Engine, EngineRequest, RequestRejected, SamplingParams, StepOutput
from gpu_worker.scheduler import InvalidSamplingParams, PromptTooLong
from gpu_worker.tokenizer import Tokenizer
from tests.gpu_worker.test_tokenizer import train_byte_level

V = 97
P = 1009  # history hash modulus


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core box: OpenMP threads contend, so run on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class HistoryModel(nn.Module):
    """Follows the Transformer contract; logits depend on every token in the slot up to the
    position, so a token written to the wrong slot or position changes what comes next."""

    def __init__(self, vocab: int = V, context: int = 256) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=context)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[int, int]] = []  # (B, S) of each forward

    def setup_caches(self, max_batch: int, max_seq_len: int) -> None:
        self.cache = torch.full((max_batch, max_seq_len), -1, dtype=torch.long)
        self.weights = torch.arange(1, max_seq_len + 1)

    def forward(self, tokens, input_pos, slots, last_only=False):
        self.calls.append(tuple(tokens.shape))
        self.cache[slots[:, None], input_pos] = tokens
        hist = self.cache[slots]  # [B, L]
        valid = torch.arange(hist.shape[1])[None, None, :] <= input_pos[:, :, None]  # [B, S, L]
        h = (((hist[:, None, :] + 1) * self.weights * valid).sum(-1)) % P  # [B, S]
        logits = history_logits(h, self.config.vocab_size)
        return logits[:, -1] if last_only else logits


def history_logits(h: torch.Tensor, vocab: int) -> torch.Tensor:
    v = torch.arange(vocab, dtype=torch.float32)
    return torch.cos((h[..., None].float() * 0.7 + 1) * (v + 1) * 0.31) * 4


def reference_greedy(prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        h = sum((t + 1) * (p + 1) for p, t in enumerate(seq)) % P
        seq.append(int(history_logits(torch.tensor(h), V).argmax()))
    return seq[len(prompt) :]


class ScriptModel(nn.Module):
    """Emits `script[position]` after the token at `position` (then `fallback`)."""

    def __init__(self, script: list[int], vocab: int, fallback: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=128)
        self.anchor = nn.Parameter(torch.zeros(()))
        self.script = script
        self.fallback = fallback

    def setup_caches(self, max_batch, max_seq_len):
        pass

    def forward(self, tokens, input_pos, slots, last_only=False):
        nxt = [
            [self.script[p] if p < len(self.script) else self.fallback for p in row]
            for row in input_pos.tolist()
        ]
        logits = torch.nn.functional.one_hot(torch.tensor(nxt), self.config.vocab_size).float()
        return logits[:, -1] * 10 if last_only else logits * 10


def run_all(engine: Engine, requests, joins: dict[int, list] | None = None) -> dict[str, list[StepOutput]]:
    """Add `requests` now and `joins[k]` before step k; step until idle."""
    joins = joins or {}
    for r in requests:
        engine.add_request(r)
    outs: dict[str, list[StepOutput]] = {}
    k = 0
    while engine.has_work() or any(j > k for j in joins):
        for r in joins.get(k, []):
            engine.add_request(r)
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
        k += 1
    return outs


def tokens_of(outs: list[StepOutput]) -> list[int]:
    return [t for o in outs for t in o.token_ids]


def prompt(n: int, start: int = 1) -> list[int]:
    return [(start + 5 * i) % V for i in range(n)]


# -- fake model ---------------------------------------------------------------------------------


def test_greedy_matches_reference_alone_and_batched():
    specs = {
        "a": (prompt(5), 12),
        "b": (prompt(5, start=3), 9),  # same length as "a": prefilled together
        "c": (prompt(11, start=7), 15),
        "d": (prompt(2, start=9), 6),
        "e": (prompt(8, start=2), 10),
    }
    req = {k: EngineRequest(k, prompt_ids=p, params=SamplingParams(max_tokens=n)) for k, (p, n) in specs.items()}
    batched = run_all(
        Engine(HistoryModel(), max_batch=3), [req["a"], req["b"], req["c"]],
        joins={2: [req["d"]], 4: [req["e"]]},
    )
    for k, (p, n) in specs.items():
        alone = run_all(Engine(HistoryModel(), max_batch=1), [req[k]])
        assert tokens_of(batched[k]) == tokens_of(alone[k]) == reference_greedy(p, n), k
        assert batched[k][-1].finish_reason == "length"
        assert batched[k][-1].completion_tokens == n


def test_prefill_groups_equal_lengths_and_decode_uses_running_count():
    model = HistoryModel()
    engine = Engine(model, max_batch=8)
    for i, n in enumerate([4, 4, 6, 4]):
        engine.add_request(EngineRequest(f"r{i}", prompt_ids=prompt(n, i), params=SamplingParams(max_tokens=3)))
    engine.step()
    assert sorted(model.calls) == [(1, 6), (3, 4)]
    model.calls.clear()
    engine.step()
    assert model.calls == [(4, 1)]  # B = running requests, not max_batch


def test_seeded_sampling_alone_equals_batched_and_seeds_matter():
    def params(seed):
        return SamplingParams(max_tokens=20, temperature=1.3, top_k=40, top_p=0.95, seed=seed)

    target = EngineRequest("t", prompt_ids=prompt(6), params=params(7))
    mates = [
        EngineRequest("m1", prompt_ids=prompt(6, 2), params=params(8)),
        EngineRequest("m2", prompt_ids=prompt(3, 4), params=SamplingParams(max_tokens=25)),
        EngineRequest("m3", prompt_ids=prompt(9, 5), params=params(None)),
    ]
    alone = tokens_of(run_all(Engine(HistoryModel(), max_batch=1), [target])["t"])
    batched = run_all(Engine(HistoryModel(), max_batch=4), mates[:2], joins={3: [target, mates[2]]})
    assert tokens_of(batched["t"]) == alone
    other_seed = EngineRequest("t", prompt_ids=prompt(6), params=params(8))
    assert tokens_of(run_all(Engine(HistoryModel(), max_batch=1), [other_seed])["t"]) != alone


def test_cancel_frees_the_slot_and_leaves_others_unchanged():
    engine = Engine(HistoryModel(), max_batch=2)
    a = EngineRequest("a", prompt_ids=prompt(4), params=SamplingParams(max_tokens=10))
    b = EngineRequest("b", prompt_ids=prompt(5, 3), params=SamplingParams(max_tokens=30))
    c = EngineRequest("c", prompt_ids=prompt(6, 6), params=SamplingParams(max_tokens=8))
    for r in (a, b, c):
        engine.add_request(r)
    outs: dict[str, list[StepOutput]] = {}
    for _ in range(3):
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert engine.num_running == 2 and engine.num_waiting == 1 and engine.free_slots == 0
    assert engine.cancel("b")
    assert not engine.cancel("b") and not engine.cancel("unknown")
    step = engine.step()
    cancelled = [o for o in step if o.request_id == "b"]
    assert cancelled[0].finished and cancelled[0].finish_reason == "cancelled"
    assert cancelled[0].token_ids == [] and cancelled[0].completion_tokens == 3
    assert any(o.request_id == "c" and o.is_first for o in step)  # c took b's slot
    for o in step:
        outs.setdefault(o.request_id, []).append(o)
    rest = run_all(engine, [])
    for k, v in rest.items():
        outs.setdefault(k, []).extend(v)
    assert tokens_of(outs["a"]) == reference_greedy(prompt(4), 10)
    assert tokens_of(outs["c"]) == reference_greedy(prompt(6, 6), 8)
    assert engine.free_slots == 2 and not engine.has_work()


def test_cancel_while_waiting():
    engine = Engine(HistoryModel(), max_batch=1)
    engine.add_request(EngineRequest("a", prompt_ids=prompt(4), params=SamplingParams(max_tokens=3)))
    engine.add_request(EngineRequest("b", prompt_ids=prompt(4), params=SamplingParams(max_tokens=3)))
    assert engine.cancel("b")
    outs = run_all(engine, [])
    assert [o.finish_reason for o in outs["b"]] == ["cancelled"]
    assert outs["b"][0].ttft_s is None and outs["b"][0].queue_s is None


def test_rejections_are_typed():
    engine = Engine(HistoryModel(context=16), max_batch=1)
    with pytest.raises(PromptTooLong) as info:
        engine.add_request(EngineRequest("x", prompt_ids=prompt(16)))
    assert info.value.reason == "prompt_too_long"
    with pytest.raises(RequestRejected, match="prompt_ids must be integers"):
        engine.add_request(EngineRequest("x", prompt_ids=[1, V]))
    with pytest.raises(RequestRejected, match="no tokenizer"):
        engine.add_request(EngineRequest("x", prompt="hello"))
    with pytest.raises(RequestRejected, match="exactly one"):
        engine.add_request(EngineRequest("x"))
    with pytest.raises(InvalidSamplingParams):
        engine.add_request(EngineRequest("x", prompt_ids=[1], params=SamplingParams(stop=["a"])))
    assert not engine.has_work()
    with pytest.raises(ValueError, match="exceeds"):
        Engine(HistoryModel(context=16), max_seq_len=32)


def test_context_full_finishes_with_length():
    engine = Engine(HistoryModel(context=16), max_batch=1)
    outs = run_all(engine, [EngineRequest("a", prompt_ids=prompt(12), params=SamplingParams(max_tokens=100))])
    assert len(tokens_of(outs["a"])) == 4 and outs["a"][-1].finish_reason == "length"


def test_timings_on_a_fake_clock():
    now = [0.0]

    def clock():
        now[0] += 1.0
        return now[0]

    engine = Engine(HistoryModel(), max_batch=1, clock=clock)
    engine.add_request(EngineRequest("a", prompt_ids=prompt(3), params=SamplingParams(max_tokens=2)))
    engine.add_request(EngineRequest("b", prompt_ids=prompt(3), params=SamplingParams(max_tokens=2)))
    # clock: add a=1, add b=2; step 1: start=3, end=4; step 2: 5, 6; step 3: b admitted 7, end 8
    first = engine.step()[0]
    assert (first.queue_s, first.ttft_s, first.elapsed_s) == (2.0, 3.0, 3.0) and first.is_first
    assert engine.step()[0].finished
    b = engine.step()[0]
    assert (b.queue_s, b.ttft_s) == (5.0, 6.0)


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on():
    model = HistoryModel()
    engine = Engine(model, max_batch=2)
    engine.add_request(EngineRequest("a", prompt_ids=prompt(3), params=SamplingParams(max_tokens=5)))
    engine.step()
    real_forward = model.forward
    model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device fell over"))
    outs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("a", "error")]
    assert "device fell over" in outs[0].error and engine.free_slots == 2
    model.forward = real_forward
    again = run_all(engine, [EngineRequest("a", prompt_ids=prompt(3), params=SamplingParams(max_tokens=5))])
    assert tokens_of(again["a"]) == reference_greedy(prompt(3), 5)


def test_generate_and_early_close():
    engine = Engine(HistoryModel(), max_batch=2)
    outs = list(engine.generate(prompt(4), SamplingParams(max_tokens=6)))
    assert tokens_of(outs) == reference_greedy(prompt(4), 6) and outs[-1].finished
    gen = engine.generate(prompt(4), SamplingParams(max_tokens=50))
    next(gen)
    gen.close()
    assert not engine.has_work() and engine.free_slots == 2


# -- text layer -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    raw = train_byte_level()
    return Tokenizer(raw, eos_token_ids=[raw.token_to_id("<|end_of_text|>")])


def scripted(tok: Tokenizer, text: str, prompt_len: int, then: int) -> ScriptModel:
    ids = tok._tok.encode(text, add_special_tokens=False).ids
    return ScriptModel([0] * (prompt_len - 1) + ids + [then], vocab=tok.vocab_size, fallback=then)


def test_text_deltas_hold_split_characters_and_stop_strings(tok):
    eos = next(iter(tok.eos_token_ids))
    model = scripted(tok, "café 日本 🎉 STOP and more", prompt_len=3, then=eos)
    engine = Engine(model, tok, max_batch=2)
    params = SamplingParams(max_tokens=100, stop=["STOP"])
    outs = run_all(engine, [EngineRequest("a", prompt_ids=[5, 6, 7], params=params)])["a"]
    assert all("\ufffd" not in o.text for o in outs)
    assert any(o.text == "" and o.token_ids for o in outs)  # something was held back
    assert "".join(o.text for o in outs) == "café 日本 🎉 "
    assert outs[-1].finish_reason == "stop" and engine.free_slots == 2


def test_eos_ends_with_stop_and_flushes(tok):
    eos = next(iter(tok.eos_token_ids))
    model = scripted(tok, "naïve 中文", prompt_len=2, then=eos)
    engine = Engine(model, tok, max_batch=1)
    outs = list(engine.generate([1, 2], SamplingParams(max_tokens=100)))
    assert "".join(o.text for o in outs) == "naïve 中文"
    assert outs[-1].finish_reason == "stop" and outs[-1].token_ids == [eos] and outs[-1].text == ""
    ignoring = list(engine.generate([1, 2], SamplingParams(max_tokens=30, ignore_eos=True)))
    assert ignoring[-1].finish_reason == "length" and ignoring[-1].completion_tokens == 30


def test_text_prompt_is_encoded(tok):
    eos = next(iter(tok.eos_token_ids))
    engine = Engine(ScriptModel([], vocab=tok.vocab_size, fallback=eos), tok, max_batch=1)
    engine.add_request(EngineRequest("a", prompt="héllo wörld"))
    (out,) = engine.step()
    assert out.prompt_tokens == len(tok.encode("héllo wörld")) and out.finish_reason == "stop"


# -- the real tiny checkpoint -------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    make_model = pytest.importorskip("gpu_worker.make_model")
    return make_model.make_model("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from gpu_worker.weights import load_model

    return load_model(tiny_dir), Tokenizer.from_dir(tiny_dir)


TEXTS = ["Hello, world", "The quick brown fox", "Ember streams tokens over Kafka", "café 日本"]


def _tiny_engine(tiny, max_batch):
    model, tokenizer = tiny
    return Engine(model, tokenizer, max_batch=max_batch, max_seq_len=128)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=24, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_tiny_model_same_tokens_alone_and_batched(tiny, params):
    reqs = [
        EngineRequest(f"r{i}", prompt=t, params=replace(params, seed=(params.seed or 0) + i))
        for i, t in enumerate(TEXTS)
    ]
    alone = {}
    for r in reqs:
        alone[r.request_id] = tokens_of(run_all(_tiny_engine(tiny, 1), [r])[r.request_id])
    batched = run_all(_tiny_engine(tiny, 4), reqs[:2], joins={3: reqs[2:3], 7: reqs[3:]})
    for r in reqs:
        assert tokens_of(batched[r.request_id]) == alone[r.request_id], r.request_id
        assert len(alone[r.request_id]) == 24


def test_tiny_model_cancel_frees_slot(tiny):
    engine = _tiny_engine(tiny, 2)
    long = SamplingParams(max_tokens=40, ignore_eos=True)
    for i in range(3):
        engine.add_request(EngineRequest(f"r{i}", prompt=TEXTS[i], params=long))
    engine.step()
    engine.step()
    assert engine.free_slots == 0 and engine.num_waiting == 1
    engine.cancel("r0")
    outs = {o.request_id: o for o in engine.step()}
    assert outs["r0"].finish_reason == "cancelled"
    assert outs["r2"].is_first  # took the freed slot
    expected = tokens_of(run_all(_tiny_engine(tiny, 1), [EngineRequest("r2", prompt=TEXTS[2], params=long)])["r2"])
    rest = run_all(engine, [])
    assert [outs["r2"].token_ids[0], *tokens_of(rest["r2"])] == expected


def test_local_generate_json(tiny_dir, capsys):
    from gpu_worker.commands import add_commands
    import argparse

    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    args = parser.parse_args(
        ["local-generate", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "8", "--json",
         "--temperature", "0.7", "--seed", "3"]
    )
    assert args.func(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["finish_reason"] in ("stop", "length")
    assert 1 <= len(result["token_ids"]) <= 8 and result["prompt_tokens"] >= 1
    assert isinstance(result["text"], str) and "ttft_s" in result["timings"]
    again = parser.parse_args(
        ["local-generate", str(tiny_dir), "--prompt", "Hello", "--max-tokens", "8", "--json",
         "--temperature", "0.7", "--seed", "3"]
    )
    again.func(again)
    assert json.loads(capsys.readouterr().out)["token_ids"] == result["token_ids"]


def test_local_generate_streams_text(tiny_dir, tiny, capsys):
    from gpu_worker.local_generate import run

    args = SimpleNamespace(
        model_dir=tiny_dir, prompt="Hello", max_tokens=6, temperature=0.0, top_k=0, top_p=1.0,
        seed=None, stop=[], dtype=None, device="cpu", json=False,
    )
    assert run(args) == 0
    out = capsys.readouterr().out
    engine = _tiny_engine(tiny, 1)
    expected = "".join(o.text for o in engine.generate("Hello", SamplingParams(max_tokens=6)))
    assert out == expected + "\n"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decode_matches_eager(tiny_dir):
    from gpu_worker.weights import load_model

    tokenizer = Tokenizer.from_dir(tiny_dir)
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    reqs = [EngineRequest(f"r{i}", prompt=t, params=params) for i, t in enumerate(TEXTS[:3])]
    graphed = Engine(load_model(tiny_dir, device="cuda"), tokenizer, max_batch=4, max_seq_len=128)
    eager = Engine(
        load_model(tiny_dir, device="cuda"), tokenizer, max_batch=4, max_seq_len=128,
        cuda_graph_batch_sizes=None,
    )
    assert graphed.runner.graph_batch_sizes == [1, 2, 4]
    a = run_all(graphed, reqs)
    b = run_all(eager, reqs)
    for r in reqs:
        assert tokens_of(a[r.request_id]) == tokens_of(b[r.request_id])


def test_warm_up_leaves_the_engine_idle():
    model = HistoryModel()
    engine = Engine(model, max_batch=2)
    assert engine.warm_up() > 0
    assert not engine.has_work() and engine.free_slots == 2
    assert (2, 16) in model.calls and (2, 1) in model.calls
