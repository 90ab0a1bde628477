"""Load a Hugging Face Llama-family checkpoint (config.json + safetensors) into `Transformer`.

A named pipeline, each step reusable by other loaders (the packed artifact loader among them):
read config -> build on the meta device (no random init) -> plan (pure: our name -> HF name,
shapes checked before any byte is read) -> read tensors (safe_open, cast only where the dtype
differs) -> assign (`load_state_dict(assign=True)`, tie embeddings).
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from gpu_worker.model import ModelConfig, Transformer, UnsupportedModelError

__all__ = [
    "CheckpointNotFoundError",
    "MissingTensorError",
    "ShapeMismatchError",
    "UnexpectedTensorError",
    "UnsupportedModelError",
    "WeightsError",
    "assign_weights",
    "build_meta_model",
    "ember_to_hf_name",
    "expected_shapes",
    "hf_to_ember_name",
    "load_model",
    "plan_load",
    "read_checkpoint_shapes",
    "read_config",
    "read_generation_config",
]

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class WeightsError(Exception):
    """A checkpoint that cannot be loaded; the message says which file or tensor and why."""


class CheckpointNotFoundError(WeightsError, FileNotFoundError):
    pass


class MissingTensorError(WeightsError):
    pass


class ShapeMismatchError(WeightsError):
    pass


class UnexpectedTensorError(WeightsError):
    pass


# ---- names (pure) ----

_TOP_LEVEL = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_IN_LAYER = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_LEVEL_BACK = {v: k for k, v in _TOP_LEVEL.items()}
_IN_LAYER_BACK = {v: k for k, v in _IN_LAYER.items()}
_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_EMBER_LAYER = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)")
_IGNORED_HF = re.compile(r".*\.rotary_emb\.inv_freq")  # written by old transformers versions


def hf_to_ember_name(name: str) -> str | None:
    """'model.layers.3.mlp.gate_proj.weight' -> 'layers.3.feed_forward.w1.weight'.

    None for a name this model has no parameter for.
    """
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    m = _HF_LAYER.fullmatch(name)
    if m and m[2] in _IN_LAYER:
        return f"layers.{m[1]}.{_IN_LAYER[m[2]]}.{m[3]}"
    return None


def ember_to_hf_name(name: str) -> str:
    """Inverse of `hf_to_ember_name`."""
    if name in _TOP_LEVEL_BACK:
        return _TOP_LEVEL_BACK[name]
    m = _EMBER_LAYER.fullmatch(name)
    if m and m[2] in _IN_LAYER_BACK:
        return f"model.layers.{m[1]}.{_IN_LAYER_BACK[m[2]]}.{m[3]}"
    raise KeyError(f"no Hugging Face name for {name!r}")


# ---- config ----


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path} not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable JSON ({exc})") from exc


@contextlib.contextmanager
def _open_safetensors(path: Path, device: str = "cpu") -> Iterator:
    """safe_open, with a damaged file reported as a WeightsError naming it."""
    try:
        f = safe_open(path, framework="pt", device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError or OSError
        raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from exc
    with f:
        yield f


def read_config(model_dir: Path) -> ModelConfig:
    return ModelConfig.from_hf(_read_json(Path(model_dir) / "config.json"))


def read_generation_config(model_dir: Path) -> list[int]:
    """End-of-sequence token ids from generation_config.json, else config.json; [] if none."""
    model_dir = Path(model_dir)
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = _read_json(path).get("eos_token_id")
            if eos is not None:
                return [int(t) for t in (eos if isinstance(eos, list) else [eos])]
    return []


# ---- plan (pure) ----


@contextlib.contextmanager
def _skip_init() -> Iterator[None]:
    """No-op torch.nn.init during construction (as accelerate's init_empty_weights does): on the
    meta device init does nothing useful, and normal_ there would import torch._dynamo (~2 s)."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "zeros_", "ones_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def build_meta_model(config: ModelConfig) -> Transformer:
    """The module tree with parameters on the meta device: shapes only, nothing allocated."""
    with torch.device("meta"), _skip_init():
        return Transformer(config)


def expected_shapes(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes that a checkpoint must provide (a tied output is not)."""
    shapes = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    if model.config.tie_embeddings:
        del shapes["output.weight"]
    return shapes


def plan_load(
    expected: Mapping[str, tuple[int, ...]],
    available: Mapping[str, tuple[int, ...]],
    tie_embeddings: bool = False,
) -> dict[str, str]:
    """Map each expected name (ours) to a checkpoint name (HF), checking presence and shape.

    `available`: HF name -> shape, as the checkpoint's headers list them.
    """
    plan: dict[str, str] = {}
    for name, shape in expected.items():
        hf_name = ember_to_hf_name(name)
        if hf_name not in available:
            raise MissingTensorError(f"checkpoint has no tensor {hf_name!r} (needed for {name})")
        if tuple(available[hf_name]) != tuple(shape):
            raise ShapeMismatchError(
                f"tensor {hf_name!r} has shape {list(available[hf_name])}, "
                f"the config implies {list(shape)}"
            )
        plan[name] = hf_name
    used = set(plan.values())
    extra = sorted(
        n
        for n in available
        if n not in used
        and not _IGNORED_HF.fullmatch(n)
        and not (tie_embeddings and n == "lm_head.weight")
    )
    if extra:
        raise UnexpectedTensorError(
            f"checkpoint has {len(extra)} tensors this model does not use: {extra[:5]}"
        )
    return plan


# ---- read and assign ----


def _weight_files(model_dir: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file holding it (single file or sharded with an index)."""
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        weight_map = _read_json(index)["weight_map"]
        files = {name: model_dir / file for name, file in weight_map.items()}
        for path in set(files.values()):
            if not path.is_file():
                raise CheckpointNotFoundError(f"shard {path} named in {INDEX_FILE} not found")
        return files
    if single.is_file():
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise CheckpointNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {model_dir}")


def read_checkpoint_shapes(files: Mapping[str, Path]) -> dict[str, tuple[int, ...]]:
    """HF name -> shape, from the safetensors headers only."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in sorted(set(files.values())):
        with _open_safetensors(path) as f:
            for name in f.keys():
                if files.get(name) == path:
                    shapes[name] = tuple(f.get_slice(name).get_shape())
    missing = sorted(set(files) - set(shapes))
    if missing:
        raise MissingTensorError(f"index names tensors absent from their shard: {missing[:5]}")
    return shapes


def assign_weights(model: Transformer, tensors: Mapping[str, Tensor]) -> Transformer:
    """Give a meta-built model its tensors (our names) without copying them; tie embeddings."""
    state = dict(tensors)
    if model.config.tie_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model.requires_grad_(False).eval()


def load_model(
    model_dir: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load a Hugging Face checkpoint directory; dtype None means the config's torch_dtype.

    On CPU, tensors already in `dtype` stay mapped from the files (safetensors mmap): loading
    copies nothing and pages come in from the page cache on first use.
    """
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    dtype = dtype or config.torch_dtype
    model = build_meta_model(config)
    files = _weight_files(model_dir)
    plan = plan_load(expected_shapes(model), read_checkpoint_shapes(files), config.tie_embeddings)

    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, hf_name in plan.items():
        by_file.setdefault(files[hf_name], []).append((name, hf_name))
    tensors: dict[str, Tensor] = {}
    for path, names in by_file.items():
        with _open_safetensors(path, str(torch.device(device))) as f:
            for name, hf_name in names:
                t = f.get_tensor(hf_name)
                tensors[name] = t if t.dtype == dtype else t.to(dtype)
    return assign_weights(model, tensors)
