"""Shared fixtures of the gpu_worker tests: the tiny generated model and its packed artifact."""

from __future__ import annotations

import pytest

from gpu_worker.make_model import make_model
from gpu_worker.pack import pack


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_model("tiny", tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def packed(tiny_dir, tmp_path_factory):
    """fp32, small shards and blocks so that every boundary case is exercised."""
    out = tmp_path_factory.mktemp("packed")
    pack(tiny_dir, out, max_shard_bytes=300_000, block_bytes=16384, progress=None)
    return out


@pytest.fixture
def damaged(packed, tmp_path):
    """A private copy of the artifact to break."""
    for item in packed.rglob("*"):
        if item.is_file():
            dest = tmp_path / item.relative_to(packed)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(item.read_bytes())
    return tmp_path
