"""The one error type for bad input, and the `--on-error` policy.

Every problem a user can fix (a malformed line, an unknown tokenizer path, an
empty input set) becomes an `InputError` that names where it is, formatted as
`FILE:LINE: reason`. LINE is the 1-based line (or row) of the record, and 0
when the problem is about the path as a whole (the flake8 convention), so the
message is always parseable the same way. The CLI prints it as one line,
`error: FILE:LINE: reason`, with no traceback.
"""
from __future__ import annotations

from dataclasses import dataclass

# Reasons a single record can be skipped with `--on-error skip`; they are the
# keys of stats.json's `input.skipped`.
SKIP_REASONS = ("bad_json", "missing_field", "bad_type", "bad_utf8")


class InputError(Exception):
    """Bad input, located at `where:line`. `reason` is one of SKIP_REASONS for record-level errors."""

    def __init__(self, where: str, line: int, message: str, reason: str | None = None):
        super().__init__(f"{where}:{line}: {message}")
        self.where, self.line, self.message, self.reason = where, line, message, reason


class ConfigError(Exception):
    """A bad option value (not tied to an input file), e.g. `--seq-len: must be >= 1`."""


@dataclass(frozen=True)
class Skip:
    """A record that was skipped under `--on-error skip`, kept in stream order so counts are exact."""
    reason: str
    where: str
    line: int
    message: str


def one_line(text: str, limit: int = 300) -> str:
    """Collapses a library's exception text to one short line for an error message."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
