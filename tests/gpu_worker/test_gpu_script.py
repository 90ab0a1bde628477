"""benchmarks/gpu_cold_start.py end to end on CPU with the tiny shape, so that a single run is
enough on a CUDA machine. The CUDA variant runs only where CUDA is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_cold_start.py"


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--work-dir", str(tmp_path / "work"), "--out-dir", str(out),
         "--max-batch", "8", "--max-seq-len", "128", "--repeats", "1", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env=dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "gpu_cold_start.json").read_text())
    assert (out / "gpu_cold_start.md").read_text().startswith("# GPU cold start")
    return result


def _check(result: dict) -> None:
    assert result["pack"]["bytes"] > 0
    assert result["limits"]["page_cache_read_gbps"] > 0
    for key in ("verified", "unverified"):
        assert result["loader"][key]["total_gbps"] > 0
    spans = {s["name"] for s in result["cold_start_here"]["spans"]}
    assert {"snapshot_restore", "weights_available", "engine_build", "warm_up", "runtime_ready",
            "first_token"} <= spans
    assert [d["batch"] for d in result["decode"]] == [1, 8]
    assert all(d["tokens_per_s"] > 0 for d in result["decode"])
    assert result["cold_start_fresh_process"]["ttft_s"] > 0
    assert result["cold_start_hf_here"]["ttft_s"] > 0


@pytest.mark.slow
def test_gpu_script_on_cpu_with_the_tiny_shape(tmp_path):
    result = _run(tmp_path, "--shape", "tiny", "--device", "cpu")
    _check(result)
    assert result["limits"]["pinned_h2d_gbps"] is None
    assert not (tmp_path / "work" / "packed-tiny").exists()  # cleaned up without --keep


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_script_on_cuda_with_the_tiny_shape(tmp_path):
    result = _run(tmp_path, "--shape", "tiny", "--device", "cuda")
    _check(result)
    assert result["limits"]["pinned_h2d_gbps"] > 0
    assert result["graph_capture"]["captured"] >= 1
