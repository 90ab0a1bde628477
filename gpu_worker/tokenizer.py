"""Text <-> token ids, for the thin text layer around the engine.

The engine works on token ids only; this module turns prompts into ids and streams of generated
ids back into text deltas:

- `Tokenizer.from_dir(model_dir)` wraps `tokenizers.Tokenizer` (tokenizer.json) and reads the
  end-of-sequence ids (generation_config.json, config.json) and the BOS rule
  (tokenizer_config.json `add_bos_token`; without it, tokenizer.json's post-processor decides).
- `IncrementalDetokenizer` takes generated ids one at a time and returns the text they complete.
  A UTF-8 character split over several tokens (byte-level BPE pieces, or `<0xNN>` byte-fallback
  tokens) is held back until its last byte arrives, so no replacement character ever appears
  mid-stream; `finish()` returns whatever is left.
- `StopMatcher` finds stop strings that span deltas and holds back text that could still become
  one. The stop string itself is not emitted, nor anything after it (OpenAI and vLLM default).
- `TextStream` is the two together, one per request.

How ids become bytes. For the two decoder families used by decoder-only LLMs each token maps to a
fixed byte string, so detokenizing is concatenating bytes and running an incremental UTF-8
decoder: O(1) per token and exact.
  * ByteLevel (GPT-2, Llama 3, Qwen): each character of the token string stands for one byte
    (the GPT-2 byte-to-unicode table).
  * sentencepiece-style (Llama 2, Mistral; `Replace("▁", " ")`/`Metaspace` + `ByteFallback`):
    "▁" is a space, `<0xNN>` is the byte 0xNN, anything else is its UTF-8.
    The decoder's `Strip` of one leading space is deliberately not applied: generated text
    continues the prompt, so a leading "▁" is a real space ("Hello" + "▁world" = "Hello world").
Special tokens (EOS, BOS, ...) produce no text. Any other decoder falls back to decoding a short
window of ids with the tokenizer and diffing (the vLLM/HF-streamer method), holding back text
that ends in U+FFFD.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_GENERIC_CONTEXT = 6  # prompt ids kept as context by the generic (decode-and-diff) detokenizer


class TokenizerError(ValueError):
    """The model directory has no usable tokenizer; the message names the file."""


def _gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's `bytes_to_unicode`: printable stand-in character -> byte value."""
    keep = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in keep}
    n = 0
    for b in range(256):
        if b not in keep:
            table[chr(256 + n)] = b
            n += 1
    return table


_UNICODE_TO_BYTE = _gpt2_unicode_to_byte()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path}: unreadable JSON ({exc})") from exc


def _ids(value: Any) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, int):
        return {value}
    return {int(v) for v in value}


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json writes tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _decoder_style(decoder: dict[str, Any] | None) -> tuple[str, bool]:
    """(style, byte_fallback) for the decoder in tokenizer.json.

    style is "byte_level", "metaspace" or "generic" (anything this module does not map to bytes).
    """
    if not decoder:
        return "generic", False
    parts = decoder["decoders"] if decoder.get("type") == "Sequence" else [decoder]
    styles: set[str] = set()
    byte_fallback = False
    for part in parts:
        kind = part.get("type")
        if kind == "ByteLevel":
            styles.add("byte_level")
        elif kind == "Metaspace" and part.get("replacement", "▁") == "▁":
            styles.add("metaspace")
        elif kind == "Replace" and part.get("pattern", {}).get("String") == "▁" and part.get(
            "content"
        ) == " ":
            styles.add("metaspace")
        elif kind == "ByteFallback":
            byte_fallback = True
        elif kind in ("Fuse", "Strip"):
            continue  # Fuse: no-op on bytes; Strip: see the module docstring
        else:
            return "generic", False
    if styles == {"byte_level"} and not byte_fallback:
        return "byte_level", False
    if styles == {"metaspace"} or (not styles and byte_fallback):
        return "metaspace", byte_fallback
    return "generic", False


class Tokenizer:
    """A Hugging Face `tokenizer.json` plus the special-token facts generation needs."""

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_token_ids: Iterable[int] = (),
        bos_token_id: int | None = None,
        add_bos: bool | None = None,
    ) -> None:
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.bos_token_id = bos_token_id
        # None: tokenizer.json's post-processor decides (it adds BOS for Llama 3, nothing for Qwen).
        self.add_bos = add_bos
        added = tokenizer.get_added_tokens_decoder()
        self.special_token_ids = frozenset(i for i, t in added.items() if t.special)
        self._added_content = {i: t.content for i, t in added.items() if not t.special}
        self.style, self._byte_fallback = _decoder_style(json.loads(tokenizer.to_str())["decoder"])
        self._bytes_cache: dict[int, bytes] = {}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"{path}: missing (a Hugging Face fast-tokenizer file is needed)")
        try:
            tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{path}: cannot be loaded ({exc})") from exc
        tok_config = _read_json(model_dir / "tokenizer_config.json")
        eos = _ids(_read_json(model_dir / "generation_config.json").get("eos_token_id"))
        eos |= _ids(_read_json(model_dir / "config.json").get("eos_token_id"))
        eos_text = _token_content(tok_config.get("eos_token"))
        if not eos and eos_text is not None and tok.token_to_id(eos_text) is not None:
            eos.add(tok.token_to_id(eos_text))
        bos_text = _token_content(tok_config.get("bos_token"))
        bos_id = tok.token_to_id(bos_text) if bos_text is not None else None
        add_bos = tok_config.get("add_bos_token")
        if add_bos and bos_id is None:
            raise TokenizerError(
                f"{model_dir / 'tokenizer_config.json'}: add_bos_token is set but bos_token "
                f"{bos_text!r} is not in the vocabulary"
            )
        return cls(
            tok,
            eos_token_ids=eos,
            bos_token_id=bos_id,
            add_bos=None if add_bos is None else bool(add_bos),
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, with BOS when the model expects one (never twice)."""
        if self.add_bos is None:
            return self._tok.encode(text, add_special_tokens=True).ids
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in generated text (b"" for special tokens).

        Only for `style` "byte_level" and "metaspace". Memoized per id: the first sight of a
        token costs a lookup, later ones a dict hit.
        """
        cached = self._bytes_cache.get(token_id)
        if cached is None:
            cached = self._bytes_cache[token_id] = self._compute_bytes(token_id)
        return cached

    def _compute_bytes(self, token_id: int) -> bytes:
        if token_id in self.special_token_ids:
            return b""
        if token_id in self._added_content:
            return self._added_content[token_id].encode()
        piece = self._tok.id_to_token(token_id)
        if piece is None:  # ids past the tokenizer's vocabulary (padded embedding rows)
            return b""
        if self.style == "byte_level":
            try:
                return bytes(_UNICODE_TO_BYTE[c] for c in piece)
            except KeyError:
                return piece.encode()
        if self._byte_fallback:
            match = _BYTE_TOKEN.match(piece)
            if match:
                return bytes([int(match.group(1), 16)])
        return piece.replace("▁", " ").encode()


class IncrementalDetokenizer:
    """Generated ids in, text deltas out; never a partial character mid-stream.

    `prompt_ids` only matter for the generic fallback, which decodes with a little context.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._generic = tokenizer.style == "generic"
        if self._generic:
            self._ids = [i for i in prompt_ids[-_GENERIC_CONTEXT:]]
            self._prefix_offset = 0
            self._read_offset = len(self._ids)
        else:
            self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if not self._generic:
            return self._utf8.decode(self._tokenizer.token_bytes(token_id))
        self._ids.append(token_id)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character, or a token with no text yet
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def finish(self) -> str:
        """Whatever is held back (an unfinished character comes out as U+FFFD)."""
        if not self._generic:
            return self._utf8.decode(b"", final=True)
        prefix_text = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class StopMatcher:
    """Stop strings over a stream of text deltas.

    `feed(delta)` returns the text that is safe to emit and the stop string found, if any. Text
    that ends with a proper prefix of some stop string is held back until it either completes
    the stop string or cannot any more; `flush()` returns it at the end of the stream. On a
    match, neither the stop string nor anything after it is emitted.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self._held = ""
        self.matched: str | None = None

    def feed(self, delta: str) -> tuple[str, str | None]:
        if self.matched is not None:
            return "", self.matched
        if not self.stop:
            return delta, None
        text = self._held + delta
        first = None
        for s in self.stop:
            i = text.find(s)
            if i >= 0 and (first is None or i < first[0]):
                first = (i, s)
        if first is not None:
            self._held = ""
            self.matched = first[1]
            return text[: first[0]], self.matched
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], None

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held if self.matched is None else ""


@dataclass(frozen=True)
class TextDelta:
    text: str
    stop: str | None  # the stop string that ended the request, if one did


class TextStream:
    """One request's text: detokenizer then stop matcher."""

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()
    ) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopMatcher(stop)

    def add(self, token_id: int) -> TextDelta:
        text, stop = self._stops.feed(self._detok.add(token_id))
        return TextDelta(text, stop)

    def finish(self) -> str:
        """The held-back tail, at the end of a request not ended by a stop string."""
        if self._stops.matched is not None:
            return ""
        text, stop = self._stops.feed(self._detok.finish())
        return text if stop is not None else text + self._stops.flush()
