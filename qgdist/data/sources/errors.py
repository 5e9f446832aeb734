"""Bad input: one exception that names file, row and field, and the quarantine record of a skipped row."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from qgdist.core.errors import InputError


@dataclass(frozen=True)
class Rejected:
    """A row (or, with ``row=None``, a whole unreadable file) left out of the shards, and why."""

    file: str
    row: Optional[int]
    field: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BadRowError(InputError):
    """Raised under ``--on-bad-row error``: the message names the file, the row and the field."""

    hint = "use --on-bad-row quarantine to skip bad rows, count them and list them"

    def __init__(self, file: str, row: Optional[int], field: str, reason: str):
        self.record = Rejected(file, row, field, reason)
        where = "whole file" if row is None else f"row {row}"
        super().__init__(f"{file}: {where}, field {field!r}: {reason}", file=file, row=row, field=field, got=reason)

    @classmethod
    def from_record(cls, record: Rejected) -> "BadRowError":
        return cls(record.file, record.row, record.field, record.reason)
