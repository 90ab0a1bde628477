"""Runtime snapshot: deterministic start-up state, built once at pack time, restored at start.

What a worker otherwise rebuilds at every start, and what the snapshot holds instead
(`<artifact>/snapshot/`, JSON and msgpack only, never pickle):

    runtime.json         model config; end-of-sequence ids; the tokenizer's facts (BOS rule,
                         special and added tokens, decoder style), which `Tokenizer.__init__`
                         derives by serializing the whole tokenizer to JSON and parsing it back;
                         the shape plan (our tensor name -> shape); the CUDA graph plan (decode
                         batch sizes to capture); the compile-cache status
    token_bytes.msgpack  the per-token byte table `IncrementalDetokenizer` reads (one bytes value
                         per id), which the plain path computes token by token
    tokenizer.json       the exact tokenizer file the snapshot was built from

Restoring reads those files; the Rust `tokenizers.Tokenizer` (needed only to *encode* prompts)
is parsed from tokenizer.json later: `start_parse()` runs it on a thread (the cold path starts
it when weight streaming begins: the parse holds the GIL, the loader's threads mostly do not),
and the first `encode` parses inline if nobody started it.

Not in the snapshot, and why:
  * RoPE tables: `precompute_rope` is a few element-wise ops on [max_seq_len, head_dim]
    (about a millisecond on CPU); reading them back would cost as much.
  * torch.compile caches: the engine does not use torch.compile (it runs eagerly, with CUDA
    graphs on CUDA), so there is nothing to save; `compile_cache` in runtime.json says so, and
    whether the installed torch could (`torch.compiler.save_cache_artifacts`, torch >= 2.6).
  * CUDA graphs: they cannot be serialized. The snapshot holds the plan (batch sizes); the
    engine captures them at construction and `Engine.warm_up` runs every kernel once, both
    before the worker announces `ready`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import tokenizers
import torch

from gpu_worker.model import ModelConfig
from gpu_worker.tokenizer import Tokenizer, TokenizerError

__all__ = [
    "RUNTIME_FILE",
    "SNAPSHOT_DIR",
    "SNAPSHOT_VERSION",
    "TOKEN_BYTES_FILE",
    "RuntimeState",
    "SnapshotError",
    "SnapshotTokenizer",
    "build_snapshot",
    "rebuild_runtime_state",
    "restore_snapshot",
    "tokenizer_state",
]

SNAPSHOT_DIR = "snapshot"
SNAPSHOT_VERSION = 1
RUNTIME_FILE = "runtime.json"
TOKEN_BYTES_FILE = "token_bytes.msgpack"
TOKENIZER_FILE = "tokenizer.json"


class SnapshotError(TokenizerError):
    """A snapshot that cannot be restored; the message names the file. Repack to fix it."""


# ---- state -------------------------------------------------------------------------------------


def tokenizer_state(tokenizer: Tokenizer) -> dict[str, Any]:
    """The facts `Tokenizer.__init__`/`from_dir` derive, as plain JSON values."""
    return {
        "eos_token_ids": sorted(tokenizer.eos_token_ids),
        "bos_token_id": tokenizer.bos_token_id,
        "add_bos": tokenizer.add_bos,
        "special_token_ids": sorted(tokenizer.special_token_ids),
        "added_content": {str(i): s for i, s in sorted(tokenizer._added_content.items())},
        "style": tokenizer.style,
        "byte_fallback": tokenizer._byte_fallback,
        "vocab_size": tokenizer.vocab_size,
    }


def _token_table(tokenizer: Tokenizer) -> list[bytes] | None:
    if tokenizer.style == "generic":
        return None  # decode-and-diff: no per-token bytes exist
    return [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]


def _compile_cache_status() -> dict[str, Any]:
    compiler = getattr(torch, "compiler", None)
    return {
        "torch_compile_used": False,
        "torch_supports_cache_artifacts": hasattr(compiler, "save_cache_artifacts")
        and hasattr(compiler, "load_cache_artifacts"),
        "torch_version": torch.__version__,
        "saved": None,
        "why": "the engine runs eagerly (CUDA graphs on CUDA) and never calls torch.compile: "
        "there is no compile cache to save or restore",
    }


def _shape_plan(config: ModelConfig) -> dict[str, list[int]]:
    from gpu_worker.weights import build_meta_model, expected_shapes

    return {name: list(shape) for name, shape in expected_shapes(build_meta_model(config)).items()}


def _file_info(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    return {"nbytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def build_snapshot(
    model_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: ModelConfig,
    *,
    graph_batch_sizes: Sequence[int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Write the snapshot of the checkpoint in `model_dir` to `out_dir`. Returns
    {file name: {"nbytes", "sha256"}} for the artifact index."""
    from gpu_worker.engine import DEFAULT_GRAPH_BATCH_SIZES

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer.from_dir(model_dir)
    table = _token_table(tokenizer)
    sizes = DEFAULT_GRAPH_BATCH_SIZES if graph_batch_sizes is None else graph_batch_sizes
    runtime = {
        "version": SNAPSHOT_VERSION,
        "model_config": dataclasses.asdict(config),
        "eos_token_ids": sorted(tokenizer.eos_token_ids),
        "tokenizer": tokenizer_state(tokenizer),
        "tokenizer_json_sha256": hashlib.sha256(
            (model_dir / TOKENIZER_FILE).read_bytes()
        ).hexdigest(),
        "shape_plan": _shape_plan(config),
        "graph_plan": {"decode_batch_sizes": sorted({int(s) for s in sizes}), "device": "cuda"},
        "compile_cache": _compile_cache_status(),
        "built_at_unix": int(time.time()),
    }
    (out_dir / TOKENIZER_FILE).write_bytes((model_dir / TOKENIZER_FILE).read_bytes())
    (out_dir / RUNTIME_FILE).write_text(json.dumps(runtime, indent=1) + "\n", encoding="utf-8")
    names = [TOKENIZER_FILE, RUNTIME_FILE]
    if table is not None:
        (out_dir / TOKEN_BYTES_FILE).write_bytes(msgpack.packb(table, use_bin_type=True))
        names.append(TOKEN_BYTES_FILE)
    return {name: _file_info(out_dir / name) for name in names}


# ---- the restored tokenizer --------------------------------------------------------------------


class _Background:
    """A value computed on a daemon thread; `.get()` waits for it (and re-raises its error)."""

    def __init__(self, fn: Any, name: str) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self.seconds = 0.0

        def run() -> None:
            started = time.perf_counter()
            try:
                self._value = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller of get()
                self._error = exc
            finally:
                self.seconds = time.perf_counter() - started
                self._done.set()

        threading.Thread(target=run, name=name, daemon=True).start()

    def get(self) -> Any:
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self._value


def _parse_tokenizer(text: str, where: Path) -> tokenizers.Tokenizer:
    try:
        tok = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:  # the Rust side raises a bare Exception
        raise SnapshotError(f"{where}: cannot be loaded ({exc})") from exc
    tok.no_truncation()
    tok.no_padding()
    return tok


class SnapshotTokenizer(Tokenizer):
    """A `Tokenizer` whose facts and byte table come from a snapshot instead of being derived.

    Behaves exactly like `Tokenizer.from_dir` on the same checkpoint (tests compare every
    attribute and the ids and text they produce). With `background` the Rust tokenizer is
    parsed on a thread once `start_parse()` is called (or inline at first use, if never);
    without, it is parsed in the constructor.
    """

    def __init__(
        self,
        tokenizer_json: str,
        state: Mapping[str, Any],
        token_bytes: Sequence[bytes] | None,
        *,
        where: Path,
        background: bool = True,
    ) -> None:
        # Tokenizer.__init__ is deliberately not called: it is what the snapshot replaces.
        self._json, self._where = tokenizer_json, where
        self._parsed: _Background | None = None
        if not background:
            self._rust = _parse_tokenizer(tokenizer_json, where)
        self.eos_token_ids = frozenset(state["eos_token_ids"])
        self.bos_token_id = state["bos_token_id"]
        self.add_bos = state["add_bos"]
        self.special_token_ids = frozenset(state["special_token_ids"])
        self._added_content = {int(i): s for i, s in state["added_content"].items()}
        self.style = state["style"]
        self._byte_fallback = bool(state["byte_fallback"])
        self._bytes_cache = {}
        self._table = tuple(token_bytes) if token_bytes is not None else ()
        self._vocab_size = int(state["vocab_size"])

    def start_parse(self) -> None:
        """Parse the Rust tokenizer on a daemon thread (no-op if parsed or started)."""
        if self.__dict__.get("_rust") is None and self._parsed is None:
            self._parsed = _Background(
                lambda: _parse_tokenizer(self._json, self._where), "tokenizer-parse"
            )

    @property
    def _tok(self) -> tokenizers.Tokenizer:  # type: ignore[override]
        rust = self.__dict__.get("_rust")
        if rust is None:
            if self._parsed is None:
                rust = _parse_tokenizer(self._json, self._where)
            else:
                rust = self._parsed.get()
            self._rust = rust
        return rust

    @property
    def parse_seconds(self) -> float | None:
        """How long the background parse took (None when it did not run in the background)."""
        return None if self._parsed is None else self._parsed.seconds

    def wait_ready(self) -> None:
        """Block until the Rust tokenizer is parsed (raises its error, if any)."""
        self._tok  # noqa: B018 - the property joins the parse

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < len(self._table):
            return self._table[token_id]
        return super().token_bytes(token_id)


# ---- restore and rebuild -----------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeState:
    """What a worker needs besides the weights, restored or rebuilt."""

    config: ModelConfig
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    shape_plan: dict[str, tuple[int, ...]]
    graph_batch_sizes: tuple[int, ...]
    compile_cache: dict[str, Any]
    seconds: float  # wall time of the restore (or the rebuild), the background parse excluded
    source: str  # "snapshot" | "rebuilt"
    timings: dict[str, float] = field(default_factory=dict)  # per step, seconds


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise SnapshotError(f"{path} not found: the artifact has no snapshot; repack it") from None
    except OSError as exc:
        raise SnapshotError(f"{path}: unreadable ({exc})") from exc


def restore_snapshot(
    artifact_dir: str | os.PathLike[str], *, background_tokenizer: bool = True
) -> RuntimeState:
    """Restore the runtime state saved in `<artifact_dir>/snapshot/`."""
    from gpu_worker.pack import model_config_from_dict

    started = time.perf_counter()
    root = Path(artifact_dir) / SNAPSHOT_DIR
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer_json = _read(root / TOKENIZER_FILE).decode("utf-8")
    try:
        runtime = json.loads(_read(root / RUNTIME_FILE))
    except ValueError as exc:
        raise SnapshotError(f"{root / RUNTIME_FILE}: unreadable JSON ({exc})") from exc
    if runtime.get("version") != SNAPSHOT_VERSION:
        raise SnapshotError(
            f"{root / RUNTIME_FILE}: snapshot version {runtime.get('version')}, this Ember "
            f"reads {SNAPSHOT_VERSION}; repack with `ember pack`"
        )
    table = None
    if runtime["tokenizer"]["style"] != "generic":
        try:
            table = msgpack.unpackb(_read(root / TOKEN_BYTES_FILE), raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise SnapshotError(f"{root / TOKEN_BYTES_FILE}: unreadable ({exc})") from exc
    timings["read_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tokenizer = SnapshotTokenizer(
        tokenizer_json,
        runtime["tokenizer"],
        table,
        where=root / TOKENIZER_FILE,
        background=background_tokenizer,
    )
    timings["tokenizer_s"] = time.perf_counter() - t
    try:
        config = model_config_from_dict(runtime["model_config"])
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"{root / RUNTIME_FILE}: bad model_config ({exc})") from exc
    return RuntimeState(
        config=config,
        tokenizer=tokenizer,
        eos_token_ids=tuple(runtime["eos_token_ids"]),
        shape_plan={name: tuple(shape) for name, shape in runtime["shape_plan"].items()},
        graph_batch_sizes=tuple(runtime["graph_plan"]["decode_batch_sizes"]),
        compile_cache=dict(runtime["compile_cache"]),
        seconds=time.perf_counter() - started,
        source="snapshot",
        timings=timings,
    )


def rebuild_runtime_state(
    model_dir: str | os.PathLike[str], graph_batch_sizes: Iterable[int] | None = None
) -> RuntimeState:
    """The same state computed from the checkpoint's own files, as a worker without a snapshot
    would (plus the whole byte table, which the plain path fills one token at a time)."""
    from gpu_worker.engine import DEFAULT_GRAPH_BATCH_SIZES
    from gpu_worker.weights import read_config

    started = time.perf_counter()
    timings: dict[str, float] = {}
    t = time.perf_counter()
    tokenizer = Tokenizer.from_dir(model_dir)
    timings["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _token_table(tokenizer)  # memoized in the tokenizer itself
    timings["byte_table_s"] = time.perf_counter() - t
    t = time.perf_counter()
    config = read_config(Path(model_dir))
    shape_plan = {name: tuple(shape) for name, shape in _shape_plan(config).items()}
    timings["config_and_shapes_s"] = time.perf_counter() - t
    sizes = DEFAULT_GRAPH_BATCH_SIZES if graph_batch_sizes is None else graph_batch_sizes
    return RuntimeState(
        config=config,
        tokenizer=tokenizer,
        eos_token_ids=tuple(sorted(tokenizer.eos_token_ids)),
        shape_plan=shape_plan,
        graph_batch_sizes=tuple(sorted(set(sizes))),
        compile_cache=_compile_cache_status(),
        seconds=time.perf_counter() - started,
        source="rebuilt",
        timings=timings,
    )
