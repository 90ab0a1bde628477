"""Snapshot restore equals rebuilding the same state from the checkpoint's files."""

from __future__ import annotations

import json

import pytest

from gpu_worker.pack import pack
from gpu_worker.snapshot import (
    RUNTIME_FILE,
    SNAPSHOT_DIR,
    SnapshotError,
    SnapshotTokenizer,
    rebuild_runtime_state,
    restore_snapshot,
    tokenizer_state,
)
from gpu_worker.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world",
    "café naïve über São Paulo",
    "你好世界 東京 🚀 👍🏽 👨‍👩‍👧",
    "def f(x, y=3):\n    return x + y  # kafka",
    "",
]


@pytest.fixture(scope="module")
def packed(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    pack(tiny_dir, out, progress=None)
    return out


@pytest.mark.parametrize("background", [True, False])
def test_restored_tokenizer_equals_rebuilt(packed, tiny_dir, background):
    restored = restore_snapshot(packed, background_tokenizer=background).tokenizer
    if background:
        restored.start_parse()
    rebuilt = Tokenizer.from_dir(tiny_dir)
    assert isinstance(restored, SnapshotTokenizer)
    assert tokenizer_state(restored) == tokenizer_state(rebuilt)
    # every fact Tokenizer.__init__ derives is restored: a new one would show up here
    rebuilt_facts = set(vars(rebuilt)) - {"_tok", "_bytes_cache"}
    assert rebuilt_facts <= set(vars(restored))
    for i in range(rebuilt.vocab_size + 3):  # ids past the vocabulary included
        assert restored.token_bytes(i) == rebuilt.token_bytes(i), i
    for text in TEXTS:
        ids = rebuilt.encode(text)
        assert restored.encode(text) == ids
        assert restored.decode(ids) == rebuilt.decode(ids)
        streams = []
        for tok in (restored, rebuilt):
            detok = IncrementalDetokenizer(tok, ids[:1])
            streams.append([detok.add(i) for i in ids] + [detok.finish()])
        assert streams[0] == streams[1]
        assert "".join(streams[0]) == rebuilt.decode(ids, skip_special_tokens=True) or not text


def test_restored_state_equals_rebuilt(packed, tiny_dir):
    restored = restore_snapshot(packed)
    rebuilt = rebuild_runtime_state(tiny_dir)
    assert restored.source == "snapshot" and rebuilt.source == "rebuilt"
    assert restored.config == rebuilt.config
    assert restored.eos_token_ids == rebuilt.eos_token_ids
    assert restored.shape_plan == rebuilt.shape_plan
    assert restored.graph_batch_sizes == rebuilt.graph_batch_sizes
    assert restored.compile_cache["torch_compile_used"] is False
    assert "nothing" in restored.compile_cache["why"] or "no compile cache" in (
        restored.compile_cache["why"]
    )


def test_snapshot_files_are_safe_formats(packed):
    root = packed / SNAPSHOT_DIR
    names = sorted(p.name for p in root.iterdir())
    assert names == ["runtime.json", "token_bytes.msgpack", "tokenizer.json"]
    runtime = json.loads((root / RUNTIME_FILE).read_text())
    assert runtime["graph_plan"]["decode_batch_sizes"][0] == 1


def test_missing_or_damaged_snapshot_is_a_clear_error(packed, tmp_path):
    with pytest.raises(SnapshotError, match="repack"):
        restore_snapshot(tmp_path)
    (tmp_path / SNAPSHOT_DIR).mkdir()
    (tmp_path / SNAPSHOT_DIR / "tokenizer.json").write_text("{}")
    (tmp_path / SNAPSHOT_DIR / RUNTIME_FILE).write_text('{"version": 42}')
    with pytest.raises(SnapshotError, match="version 42"):
        restore_snapshot(tmp_path)


def test_a_bad_tokenizer_file_surfaces_at_first_use(packed, tmp_path):
    import shutil

    shutil.copytree(packed / SNAPSHOT_DIR, tmp_path / SNAPSHOT_DIR)
    (tmp_path / SNAPSHOT_DIR / "tokenizer.json").write_text('{"not": "a tokenizer"}')
    state = restore_snapshot(tmp_path)  # the parse is deferred
    state.tokenizer.start_parse()
    with pytest.raises(SnapshotError, match="tokenizer.json"):
        state.tokenizer.encode("hi")
    lazy = restore_snapshot(tmp_path).tokenizer  # never started: parsed at first use
    with pytest.raises(SnapshotError, match="tokenizer.json"):
        lazy.encode("hi")
