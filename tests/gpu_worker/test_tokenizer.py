"""Tokenizer loading, incremental detokenization across split UTF-8 characters, stop strings.

Two small tokenizers are trained here, one per family the detokenizer maps to bytes:
byte-level BPE (Llama 3 / Qwen) and sentencepiece-style BPE with `<0xNN>` byte fallback
(Llama 2 / Mistral). Their vocabularies are small, so CJK and emoji split over several tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from gpu_worker.tokenizer import (
    IncrementalDetokenizer,
    StopMatcher,
    TextStream,
    Tokenizer,
    TokenizerError,
)

CORPUS = [
    "héllo wörld, café crème brûlée, naïve façade",
    "the quick brown fox jumps over the lazy dog",
    "Ångström über straße señor",
    "日本語のテキストです。中文文本。",
    "emoji 🎉🚀 party 👍🏽 fun",
    "plain english text here, nothing special",
] * 20

SAMPLES = [
    "héllo wörld",
    "日本語のテキスト",
    "party 🎉🚀👍🏽!",
    "mixed: café 中文 🎉 end",
    "zebra ÿ Ω ✓",  # characters never seen in training
]


def train_byte_level() -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
    )
    return tok


def train_byte_fallback() -> tokenizers.Tokenizer:
    """Llama 2 layout: <unk> <s> </s>, then the 256 <0xNN> tokens, then merges' vocabulary."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=40,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    spec = json.loads(tok.to_str())
    specials = ["<unk>", "<s>", "</s>"]
    learned = sorted(
        (i, t) for t, i in spec["model"]["vocab"].items() if t not in specials
    )
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<0x{b:02X}>": len(specials) + b for b in range(256)})
    for _, t in learned:
        vocab.setdefault(t, len(vocab))
    spec["model"]["vocab"] = vocab
    spec["model"]["byte_fallback"] = True
    spec["added_tokens"] = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, t in enumerate(specials)
    ]
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    tok = train_byte_level()
    eos = tok.token_to_id("<|end_of_text|>")
    return Tokenizer(tok, eos_token_ids=[eos], bos_token_id=tok.token_to_id("<|begin_of_text|>"))


@pytest.fixture(scope="module")
def byte_fallback() -> Tokenizer:
    return Tokenizer(train_byte_fallback(), eos_token_ids=[2], bos_token_id=1, add_bos=True)


def stream(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int] = ()) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detok.add(i) for i in ids] + [detok.finish()]


def as_generic(tokenizer: Tokenizer) -> Tokenizer:
    generic = Tokenizer(
        tokenizers.Tokenizer.from_str(tokenizer._tok.to_str()),
        eos_token_ids=tokenizer.eos_token_ids,
        bos_token_id=tokenizer.bos_token_id,
        add_bos=tokenizer.add_bos,
    )
    generic.style = "generic"
    return generic


def test_styles_are_recognised(byte_level, byte_fallback):
    assert byte_level.style == "byte_level"
    assert byte_fallback.style == "metaspace"


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_level_split_characters_are_held_back(byte_level, text):
    ids = byte_level._tok.encode(text, add_special_tokens=False).ids
    # the test means something only if some token carries an incomplete character
    assert any(_is_partial(byte_level.token_bytes(i)) for i in ids)
    deltas = stream(byte_level, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == byte_level.decode(ids)


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_fallback_split_characters_are_held_back(byte_fallback, text):
    ids = byte_fallback._tok.encode(text, add_special_tokens=False).ids
    pieces = [byte_fallback._tok.id_to_token(i) for i in ids]
    if any(ord(c) > 0x2FF for c in text):
        assert any(p.startswith("<0x") for p in pieces), pieces
    deltas = stream(byte_fallback, ids)
    assert all("\ufffd" not in d for d in deltas)
    # the leading "▁" is kept: generated text continues a prompt
    assert "".join(deltas) == " " + text
    assert byte_fallback.decode(ids) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_generic_fallback_matches(byte_level, text):
    generic = as_generic(byte_level)
    prompt = generic.encode("héllo")
    ids = generic._tok.encode(text, add_special_tokens=False).ids
    deltas = stream(generic, ids, prompt)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_ids_byte_level_equal_full_decode(byte_level, data):
    ids = data.draw(st.lists(st.integers(0, byte_level.vocab_size - 1), min_size=1, max_size=12))
    deltas = stream(byte_level, ids)
    reference = byte_level.decode(ids)
    assert "".join(deltas) == reference
    if "\ufffd" not in reference:
        assert all("\ufffd" not in d for d in deltas)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_ids_byte_fallback_equal_full_decode(byte_fallback, data):
    ids = data.draw(st.lists(st.integers(3, byte_fallback.vocab_size - 1), min_size=1, max_size=12))
    reference = byte_fallback.decode(ids)
    # Invalid byte runs: we replace each maximal invalid subsequence (Python, Unicode practice),
    # the ByteFallback decoder every byte of the run; only valid text is compared exactly.
    if "\ufffd" in reference:
        return
    text = "".join(stream(byte_fallback, ids))
    if text.startswith(" "):
        # The decoder's Strip of one leading space (from "▁" or a <0x20> byte token), which
        # the stream keeps because its output continues the prompt.
        text = text[1:]
    assert text == reference


def test_unfinished_character_comes_out_at_the_end(byte_fallback):
    e6 = byte_fallback._tok.token_to_id("<0xE6>")
    detok = IncrementalDetokenizer(byte_fallback)
    assert detok.add(e6) == ""
    assert detok.finish() == "\ufffd"


def test_special_tokens_have_no_text(byte_level):
    eos = next(iter(byte_level.eos_token_ids))
    assert stream(byte_level, [eos]) == ["", ""]
    assert byte_level.token_bytes(10_000_000) == b""  # past the vocabulary


def _is_partial(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return True
    return False


# -- loading from a model directory ------------------------------------------------------------


def test_from_dir_reads_eos_and_bos(tmp_path: Path):
    train_byte_fallback().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": True, "bos_token": {"content": "<s>"}, "eos_token": "</s>"})
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.eos_token_ids == {2, 7}
    assert tok.bos_token_id == 1
    ids = tok.encode("café")
    assert ids[0] == 1 and ids[1] != 1


def test_from_dir_post_processor_decides_without_config(tmp_path: Path):
    raw = train_byte_level()
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos is None
    assert tok.encode("hi")[0] == raw.token_to_id("<|begin_of_text|>")
    assert tok.eos_token_ids == {raw.token_to_id("<|end_of_text|>")}


def test_from_dir_without_tokenizer_json(tmp_path: Path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


# -- stop strings ------------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, deltas: list[str]) -> tuple[str, str | None]:
    out, stop = [], None
    for d in deltas:
        text, stop = matcher.feed(d)
        out.append(text)
        if stop:
            break
    if stop is None:
        out.append(matcher.flush())
    return "".join(out), stop


def test_stop_string_spanning_deltas_is_held_then_dropped():
    m = StopMatcher(["STOP"])
    assert m.feed("Hel") == ("Hel", None)
    assert m.feed("lo ST") == ("lo ", None)  # "ST" could start "STOP"
    assert m.feed("OP and more") == ("", "STOP")
    assert m.feed("later") == ("", "STOP")


def test_false_alarm_is_released():
    m = StopMatcher(["STOP"])
    assert m.feed("a ST") == ("a ", None)
    assert m.feed("ART") == ("START", None)
    assert m.feed("x S") == ("x ", None)
    assert m.flush() == "S"


def test_earliest_of_several_stops_wins():
    assert feed_all(StopMatcher(["world", "lo w"]), ["hel", "lo wor", "ld"]) == ("hel", "lo w")
    assert feed_all(StopMatcher(["\n\n", "."]), ["one", ".\n", "\ntwo"]) == ("one", ".")


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abS TOP", max_size=40),
    cuts=st.lists(st.integers(0, 40), max_size=8),
    stops=st.lists(st.text(alphabet="abS TOP", min_size=1, max_size=4), min_size=1, max_size=3),
)
def test_stop_matcher_equals_cutting_at_first_match(text, cuts, stops):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    hits = [(text.find(s), s) for s in stops if s in text]
    expected = text[: min(hits)[0]] if hits else text
    out, stop = feed_all(StopMatcher(stops), deltas)
    assert out == expected
    assert (stop is not None) == bool(hits)


def test_text_stream_stop_spans_tokens(byte_level):
    ids = byte_level._tok.encode("café STOP 日本", add_special_tokens=False).ids
    ts = TextStream(byte_level, stop=["STOP"])
    out, stop = [], None
    for i in ids:
        d = ts.add(i)
        out.append(d.text)
        if d.stop:
            stop = d.stop
            break
    assert stop == "STOP"
    assert "".join(out) == "café "


def test_text_stream_without_stop_flushes(byte_fallback):
    e6 = byte_fallback._tok.token_to_id("<0xE6>")
    ts = TextStream(byte_fallback, stop=["xyz"])
    ids = byte_fallback._tok.encode("wx", add_special_tokens=False).ids
    out = [ts.add(i).text for i in ids]
    assert ts.add(e6).text == ""  # the first byte of a 3-byte character
    assert "".join(out) + ts.finish() == " wx\ufffd"
