"""Sampling: greedy, temperature / top-k / top-p cuts, per-request reproducibility."""

from __future__ import annotations

import pytest
import torch

from gpu_worker.sampling import SamplingParams, make_generator, sample
from gpu_worker.scheduler import InvalidSamplingParams

V = 50


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny ops on a shared 2-core box: OpenMP threads contend, so run on one."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def rand_logits(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, V, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = rand_logits(4)
    params = [SamplingParams()] * 4
    assert torch.equal(sample(logits, params, [None] * 4), logits.argmax(-1))


def test_seeded_rows_do_not_depend_on_batch_mates():
    target = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=1234)
    others = [
        SamplingParams(temperature=1.5, seed=1),
        SamplingParams(),  # greedy
        SamplingParams(temperature=0.3, top_p=0.5),
    ]
    alone_gen, _ = make_generator(target.seed)
    batch_gens = [make_generator(p.seed)[0] for p in others]
    batch_gen, _ = make_generator(target.seed)
    alone, batched = [], []
    for step in range(200):
        row = rand_logits(1, seed=step)
        alone.append(int(sample(row, [target], [alone_gen])[0]))
        mates = rand_logits(3, seed=1000 + step)
        # the target sits in a different row each step
        at = step % 4
        logits = torch.cat([mates[:at], row, mates[at:]])
        params = others[:at] + [target] + others[at:]
        gens = batch_gens[:at] + [batch_gen] + batch_gens[at:]
        batched.append(int(sample(logits, params, gens)[at]))
    assert alone == batched
    assert len(set(alone)) > 5  # really sampling


def test_greedy_rows_keep_argmax_in_mixed_batch():
    logits = rand_logits(3)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=3), SamplingParams()]
    gens = [None, make_generator(3)[0], None]
    out = sample(logits, params, gens)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()


def test_top_k_and_top_p_restrict_the_support():
    logits = rand_logits(1, seed=7)
    order = logits[0].argsort(descending=True).tolist()
    probs = logits[0].softmax(-1)[order]
    nucleus = int((probs.cumsum(-1) - probs < 0.6).sum())
    gen, _ = make_generator(0)
    top3 = {int(sample(logits, [SamplingParams(temperature=1, top_k=3)], [gen])) for _ in range(300)}
    assert top3 == set(order[:3])
    nuc = {int(sample(logits, [SamplingParams(temperature=1, top_p=0.6)], [gen])) for _ in range(300)}
    assert nuc == set(order[:nucleus])
    assert int(sample(logits, [SamplingParams(temperature=1, top_k=1)], [gen])) == order[0]


def test_frequencies_follow_softmax_with_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    p = SamplingParams(temperature=2.0)
    gen, _ = make_generator(42)
    n = 4000
    counts = torch.bincount(torch.stack([sample(logits, [p], [gen])[0] for _ in range(n)]), minlength=4)
    expected = (logits[0] / 2.0).softmax(-1) * n
    assert torch.all((counts - expected).abs() < 5 * expected.sqrt() + 5), (counts, expected)


def test_random_seed_when_none():
    (_, a), (_, b) = make_generator(None), make_generator(None)
    assert a != b
    g1, _ = make_generator(5)
    g2, _ = make_generator(5)
    assert torch.rand(3, generator=g1).tolist() == torch.rand(3, generator=g2).tolist()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_tokens": 0},
        {"temperature": -1.0},
        {"temperature": float("nan")},
        {"top_k": -2},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"seed": -1},
        {"stop": ["", "x"]},
    ],
)
def test_invalid_params_are_rejected(kwargs):
    with pytest.raises(InvalidSamplingParams) as info:
        SamplingParams(**kwargs)
    assert info.value.reason == "invalid_sampling_params"


def test_stop_lists_become_tuples():
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")


def test_ties_at_the_cut_are_kept_together():
    logits = torch.tensor([[3.0, 3.0, 1.0, 0.0]])
    gen, _ = make_generator(0)
    seen = {int(sample(logits, [SamplingParams(temperature=1, top_k=1)], [gen])) for _ in range(100)}
    assert seen == {0, 1}


@pytest.mark.parametrize("top_k, top_p", [(0, 0.95), (0, 0.3), (700, 0.9), (5, 0.99), (300, 1.0)])
def test_cut_equals_full_sort_reference(top_k, top_p):
    """The CPU path widens a topk head until it holds the nucleus; compare with a full sort."""
    from gpu_worker.sampling import _top_k_top_p_threshold

    vocab = 1000
    scaled = torch.randn(3, vocab, generator=torch.Generator().manual_seed(top_k))  # flat-ish
    k = top_k or vocab
    threshold = _top_k_top_p_threshold(scaled, [k] * 3, [top_p] * 3)
    for row in range(3):
        values, order = scaled[row].sort(descending=True)
        kept = order[:k]
        probs = values[:k].softmax(-1)
        n = int(((probs.cumsum(-1) - probs) < top_p).sum())
        assert set((scaled[row] >= threshold[row]).nonzero().flatten().tolist()) == set(
            kept[:n].tolist()
        )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=5e-324, seed=1),  # rounds to 0 in fp32
        SamplingParams(temperature=1e-40, seed=1),  # logits / it overflow fp32
        SamplingParams(temperature=1.0, top_p=5e-324, seed=1),  # rounds to 0 in fp32
        SamplingParams(temperature=1.0, top_p=1e-12, top_k=7, seed=1),
    ],
)
def test_extreme_but_valid_params_pick_a_real_token(params):
    """Valid on the wire (temperature > 0, 0 < top_p): a tiny temperature is greedy, a tiny
    top_p keeps the most likely token; never an index outside the vocabulary."""
    logits = rand_logits(3)
    batch = [params, SamplingParams(), SamplingParams(temperature=0.7, seed=2)]
    generators = [make_generator(1)[0], None, make_generator(2)[0]]
    tokens = sample(logits, batch, generators)
    assert tokens[0] == logits[0].argmax()
    assert tokens[1] == logits[1].argmax()
    assert 0 <= int(tokens[2]) < V
