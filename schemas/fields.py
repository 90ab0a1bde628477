"""The small vocabulary every message's field table is written in.

A field is declared once, on its dataclass, with `spec(check, default=...)`. A check `read`s a
value (what msgpack decoded, or what a caller passed), returns it normalized (arrays become
tuples, integers in float fields become floats) or raises `Invalid` naming the problem, and
`write`s it back to something msgpack packs. `describe()` feeds docs/PROTOCOL.md.

Problems never echo free text (prompts, outputs, stop strings): only lengths, numbers,
identifiers and enum values appear in an error message.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from schemas.errors import ValidationError
from schemas.limits import (
    INT64_MAX,
    MAX_MAP_ENTRIES,
    MAX_MAP_KEY_CHARS,
    MAX_MAP_STR_CHARS,
)

Issue = tuple[str, str]  # (field path, problem)
MAX_ISSUES_PER_FIELD = 5


class Invalid(Exception):
    """Raised by a check: the problems of one value, with paths relative to that value."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__(issues)
        self.issues = issues

    @classmethod
    def one(cls, problem: str) -> Invalid:
        return cls([("", problem)])


def join_path(prefix: str, path: str) -> str:
    if not path:
        return prefix
    return prefix + path if path.startswith("[") else f"{prefix}.{path}"


def prefixed(prefix: str, issues: list[Issue]) -> list[Issue]:
    return [(join_path(prefix, path), problem) for path, problem in issues]


def wire_type_name(value: Any) -> str:
    """The msgpack name of a Python value's type, for messages a non-Python producer reads."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return "binary"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "map"
    return type(value).__name__


def show(value: Any) -> str:
    """A short rendering of a bad value: numbers and short identifiers, else just the type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str) and len(value) <= 64:
        return repr(value)
    return wire_type_name(value)


def number(x: float) -> str:
    return f"{x:g}"


class Check(Hashable, Protocol):
    @property
    def wire(self) -> str: ...  # msgpack type, as documented

    def read(self, value: Any) -> Any: ...

    def write(self, value: Any) -> Any: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class Text:
    max_len: int
    min_len: int = 1
    pattern: str | None = None
    choices: tuple[str, ...] = ()
    rule: Callable[[str], bool] | None = None
    shape: str = ""  # what `pattern` or `rule` ask for, in words
    _regex: re.Pattern[str] | None = dataclasses.field(default=None, init=False, repr=False)
    wire = "str"

    def __post_init__(self) -> None:
        if self.pattern:
            object.__setattr__(self, "_regex", re.compile(self.pattern))

    def read(self, value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid.one(f"must be {self._wants()}, got {wire_type_name(value)}")
        if self.choices:
            if value not in self.choices:
                raise Invalid.one(f"must be one of {', '.join(self.choices)}, got {show(value)}")
            return value
        if len(value) < self.min_len:
            raise Invalid.one("must not be empty" if self.min_len == 1 else self._length(value))
        if len(value) > self.max_len:
            raise Invalid.one(self._length(value))
        bad_shape = self._regex is not None and not self._regex.fullmatch(value)
        if bad_shape or (self.rule is not None and not self.rule(value)):
            raise Invalid.one(f"must be {self.shape}, got {show(value)}")
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise Invalid.one("must be valid Unicode (no lone surrogates)") from None
        return value

    def _wants(self) -> str:
        return "a string" if not self.choices else f"one of {', '.join(self.choices)}"

    def _length(self, value: str) -> str:
        return f"must have {self.min_len}..{self.max_len} characters, got {len(value)}"

    def write(self, value: str) -> str:
        return value

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(f"`{c}`" for c in self.choices)
        text = f"{self.min_len}..{self.max_len} chars"
        return f"{text}, {self.shape}" if self.shape else text


@dataclass(frozen=True)
class Int:
    min: int = 0
    max: int = INT64_MAX
    wire = "int"

    def read(self, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid.one(f"must be an integer {self._range()}, got {wire_type_name(value)}")
        if not self.min <= value <= self.max:
            raise Invalid.one(f"must be an integer {self._range()}, got {value}")
        return value

    def _range(self) -> str:
        if self.max == INT64_MAX:
            return f">= {self.min}"
        return f">= {self.min} and <= {self.max}"

    def write(self, value: int) -> int:
        return value

    def describe(self) -> str:
        return self._range()


@dataclass(frozen=True)
class Float:
    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    wire = "float64 (int accepted)"

    def read(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid.one(f"must be {self._wants()}, got {wire_type_name(value)}")
        try:
            x = float(value)
        except OverflowError:
            x = math.inf
        if not (math.isfinite(x) and self._in_range(x)):
            raise Invalid.one(f"must be {self._wants()}, got {show(value)}")
        return x

    def _in_range(self, x: float) -> bool:
        if self.min is not None and (x < self.min or (self.min_exclusive and x == self.min)):
            return False
        return self.max is None or x <= self.max

    def _range(self) -> str:
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {number(self.min)}")
        if self.max is not None:
            parts.append(f"<= {number(self.max)}")
        return " and ".join(parts)

    def _wants(self) -> str:
        bounds = self._range()
        return f"a finite number {bounds}" if bounds else "a finite number"

    def write(self, value: float) -> float:
        return value

    def describe(self) -> str:
        bounds = self._range()
        return f"finite, {bounds}" if bounds else "finite"


@dataclass(frozen=True)
class Bool:
    wire = "bool"

    def read(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise Invalid.one(f"must be a boolean, got {wire_type_name(value)}")
        return value

    def write(self, value: bool) -> bool:
        return value

    def describe(self) -> str:
        return ""


@dataclass(frozen=True)
class Blob:
    """Raw bytes (msgpack bin); with `text_ok`, a str is kept as it is (a Kafka key)."""

    max_len: int
    text_ok: bool = False

    @property
    def wire(self) -> str:
        return "bin or str" if self.text_ok else "bin"

    def read(self, value: Any) -> bytes | str:
        if self.text_ok and isinstance(value, str):
            return value
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise Invalid.one(f"must be {self.wire}, got {wire_type_name(value)}")
        data = bytes(value)
        if len(data) > self.max_len:
            raise Invalid.one(f"must have at most {self.max_len} bytes, got {len(data)}")
        return data

    def write(self, value: bytes | str) -> bytes | str:
        return value

    def describe(self) -> str:
        return f"at most {self.max_len} bytes"


@dataclass(frozen=True)
class ListOf:
    item: Check
    max_items: int
    min_items: int = 0

    @property
    def wire(self) -> str:
        return f"array of {self.item.wire}"

    def read(self, value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)):
            raise Invalid.one(f"must be an {self.wire}, got {wire_type_name(value)}")
        if not self.min_items <= len(value) <= self.max_items:
            if self.min_items == 1 and not value:
                raise Invalid.one("must not be empty")
            raise Invalid.one(
                f"must have {self.min_items}..{self.max_items} items, got {len(value)}"
            )
        if self._all_valid_ints(value):
            return tuple(value)
        items, issues = [], []
        for i, v in enumerate(value):
            try:
                items.append(self.item.read(v))
            except Invalid as exc:
                issues += prefixed(f"[{i}]", exc.issues)
                if len(issues) >= MAX_ISSUES_PER_FIELD:
                    break
        if issues:
            raise Invalid(issues)
        return tuple(items)

    def _all_valid_ints(self, value: list[Any] | tuple[Any, ...]) -> bool:
        """Fast path for token ids: one pass in C instead of a check call per item."""
        if not isinstance(self.item, Int) or not value:
            return False
        if not set(map(type, value)) <= {int}:  # no bools, floats or strings
            return False
        return bool(self.item.min <= min(value) and max(value) <= self.item.max)

    def write(self, value: tuple[Any, ...]) -> list[Any]:
        return [self.item.write(v) for v in value]

    def describe(self) -> str:
        count = f"{self.min_items}..{self.max_items} items"
        inner = self.item.describe()
        return f"{count}; each {inner}" if inner else count


Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class ScalarMap:
    """A flat map of short names to scalars (nil, bool, int, finite float, short str)."""

    max_entries: int = MAX_MAP_ENTRIES
    wire = "map of str to nil/bool/int/float64/str"

    def read(self, value: Any) -> dict[str, Scalar]:
        if not isinstance(value, Mapping):
            raise Invalid.one(f"must be a map, got {wire_type_name(value)}")
        if len(value) > self.max_entries:
            raise Invalid.one(f"must have at most {self.max_entries} entries, got {len(value)}")
        out: dict[str, Scalar] = {}
        issues: list[Issue] = []
        for key, item in value.items():
            if not isinstance(key, str) or not 1 <= len(key) <= MAX_MAP_KEY_CHARS:
                issues.append(("", f"keys must be strings of 1..{MAX_MAP_KEY_CHARS} chars"))
                continue
            try:
                out[key] = _read_scalar(item)
            except Invalid as exc:
                issues += prefixed(key, exc.issues)
        if issues:
            raise Invalid(issues[:MAX_ISSUES_PER_FIELD])
        return out

    def write(self, value: dict[str, Scalar]) -> dict[str, Scalar]:
        return value

    def describe(self) -> str:
        return (
            f"at most {self.max_entries} entries; keys 1..{MAX_MAP_KEY_CHARS} chars; floats "
            f"finite; strings at most {MAX_MAP_STR_CHARS} chars"
        )


_SCALAR_FLOAT = Float()
_SCALAR_INT = Int(min=-INT64_MAX - 1)
_SCALAR_TEXT = Text(max_len=MAX_MAP_STR_CHARS, min_len=0)


def _read_scalar(value: Any) -> Scalar:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return _SCALAR_INT.read(value)
    if isinstance(value, float):
        return _SCALAR_FLOAT.read(value)
    if isinstance(value, str):
        return _SCALAR_TEXT.read(value)
    kind = wire_type_name(value)
    raise Invalid.one(f"must be nil, boolean, integer, float or string, got {kind}")


class Record(Protocol):
    """What `Nested` needs of a class: a map in, a map out, SchemaError on bad input."""

    def to_map(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Nested:
    cls: Any  # a class with `from_map(mapping)` and instances with `to_map()`
    wire = "map"

    def read(self, value: Any) -> Any:
        if isinstance(value, self.cls):
            return value
        if not isinstance(value, Mapping):
            raise Invalid.one(f"must be a map, got {wire_type_name(value)}")
        try:
            return self.cls.from_map(value)
        except ValidationError as exc:
            raise Invalid([(p.path, p.problem) for p in exc.problems]) from None

    def write(self, value: Record) -> dict[str, Any]:
        return value.to_map()

    def describe(self) -> str:
        schema = getattr(self.cls, "SCHEMA", None)
        return f"a `{schema.name}` map" if schema else f"a `{self.cls.__name__}` map"


# --- field specs -------------------------------------------------------------------------

REQUIRED: Any = dataclasses.MISSING


def spec(check: Check, *, default: Any = REQUIRED, sensitive: bool = False, doc: str = "") -> Any:
    """Declare a dataclass field with its check. `sensitive` hides the value from repr."""
    metadata = {"check": check, "sensitive": sensitive, "doc": doc}
    if isinstance(default, (dict, list)):
        empty = type(default)
        return dataclasses.field(default_factory=empty, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class FieldSpec:
    name: str
    check: Check
    required: bool
    default: Any  # REQUIRED when required
    sensitive: bool
    doc: str

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


_SPECS: dict[type, tuple[FieldSpec, ...]] = {}


def field_specs(cls: type) -> tuple[FieldSpec, ...]:
    """The field table of a message class, in declaration order."""
    specs = _SPECS.get(cls)
    if specs is None:
        specs = tuple(_field_spec(f) for f in dataclasses.fields(cls))
        _SPECS[cls] = specs
    return specs


def _field_spec(f: dataclasses.Field[Any]) -> FieldSpec:
    if f.default is not dataclasses.MISSING:
        default: Any = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory
    else:
        default = REQUIRED
    return FieldSpec(
        name=f.name,
        check=f.metadata["check"],
        required=default is REQUIRED,
        default=default,
        sensitive=f.metadata["sensitive"],
        doc=f.metadata["doc"],
    )


_ABSENT = object()


def read_fields(
    specs: tuple[FieldSpec, ...], values: Mapping[str, Any]
) -> tuple[dict[str, Any], list[Issue]]:
    """Check every field of `values` against its spec. Absent or nil means the default; unknown
    keys are ignored (forward compatibility). Returns normalized values and all problems."""
    out: dict[str, Any] = {}
    issues: list[Issue] = []
    for fs in specs:
        value = values.get(fs.name, _ABSENT)
        if value is fs.default:  # a default is valid as it is (None, 1, "", ...)
            out[fs.name] = value
            continue
        if value is _ABSENT or value is None:
            if fs.required:
                missing = "required field missing" if value is _ABSENT else "required, got nil"
                issues.append((fs.name, missing))
            else:
                out[fs.name] = fs.default_value()
            continue
        try:
            out[fs.name] = fs.check.read(value)
        except Invalid as exc:
            issues += prefixed(fs.name, exc.issues)
    return out, issues


def write_fields(specs: tuple[FieldSpec, ...], obj: Any) -> dict[str, Any]:
    """Field values ready for msgpack, in declaration order; nil fields are left out."""
    out: dict[str, Any] = {}
    for fs in specs:
        value = getattr(obj, fs.name)
        if value is not None:
            out[fs.name] = fs.check.write(value)
    return out
