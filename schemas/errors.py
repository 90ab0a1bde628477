"""Typed errors of the wire protocol.

Every error names the schema and carries a list of `FieldProblem`s, one per bad field, so a
message reads like `request: temperature: must be a finite number >= 0, got nan`. `reason`
is a stable code that dead letters and rejection chunks reuse.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class FieldProblem:
    """One bad field: `path` is dotted (`request.top_p`, `stop[2]`); empty for the whole value."""

    path: str
    problem: str

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}" if self.path else self.problem

    def to_map(self) -> dict[str, str]:
        return {"path": self.path, "problem": self.problem}

    @classmethod
    def from_map(cls, value: Mapping[str, Any]) -> FieldProblem:
        path, problem = value.get("path", ""), value.get("problem")
        if not (isinstance(path, str) and isinstance(problem, str)):
            raise ValidationError("", [cls("", "must be a map {path: str, problem: str}")])
        if len(path) > 256 or len(problem) > 1024:
            raise ValidationError("", [cls("", "path <= 256 and problem <= 1024 characters")])
        return cls(path, problem)


class SchemaError(ValueError):
    """A value or key that is not a valid Ember message. Subclasses say which way it failed."""

    reason: ClassVar[str] = "invalid"

    def __init__(self, schema: str, problems: Iterable[FieldProblem]) -> None:
        self.schema = schema
        self.problems: tuple[FieldProblem, ...] = tuple(problems)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        details = "; ".join(str(p) for p in self.problems) or "invalid"
        return f"{self.schema}: {details}" if self.schema else details


class DecodeError(SchemaError):
    """The bytes are not a msgpack map (or too large, or not UTF-8 where text is required)."""

    reason = "undecodable"


class ValidationError(SchemaError):
    """A msgpack map whose fields are missing, mistyped or out of range."""

    reason = "invalid"


class VersionError(SchemaError):
    """A message written with a major version this reader cannot read."""

    reason = "unsupported_version"


class KeyDecodeError(SchemaError):
    """A Kafka record key that is missing, empty or not UTF-8."""

    reason = "bad_key"
