"""gpu_worker.checksum: every installed CRC-32 implementation gives zlib's values."""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest

from gpu_worker import checksum


@pytest.mark.parametrize("name", list(checksum.crc32_impls()))
def test_every_crc32_implementation_matches_zlib(name: str) -> None:
    fn = checksum.crc32_impls()[name]
    data = os.urandom(3 << 20) + bytes(4096)
    view = memoryview(data)
    assert fn(view) == zlib.crc32(data)
    assert fn(view[1000:], fn(view[:1000])) == zlib.crc32(data)  # continues a running value
    assert fn(b"") == 0


def test_block_digest_and_running_crc() -> None:
    data = bytes(range(256)) * 1000
    assert checksum.block_digest("crc32", data) == f"{zlib.crc32(data):08x}"
    assert checksum.crc32(data[100:], checksum.crc32(data[:100])) == zlib.crc32(data)
    assert len(checksum.block_digest("sha256", data)) == 64
    with pytest.raises(ValueError, match="unknown block digest"):
        checksum.block_digest("md5", data)


def test_forced_implementation_and_torch_free_import() -> None:
    code = (
        "import sys; import gpu_worker.checksum as c; "
        "assert 'torch' not in sys.modules; print(c.CRC32_IMPL)"
    )
    env = dict(os.environ, EMBER_CRC32="zlib")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "zlib"
    env["EMBER_CRC32"] = "no-such-crc"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "not installed" in out.stderr
