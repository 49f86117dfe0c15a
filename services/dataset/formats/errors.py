"""The two ways reading an upload fails: the whole upload (SourceError) or one record
(RecordError, yielded in the record's place so one bad line costs that line only)."""

from __future__ import annotations

from dataclasses import dataclass


class SourceError(Exception):
    """The upload as a whole cannot be read; the message starts with the filename."""


@dataclass(frozen=True)
class RecordError:
    """One record that cannot be read, and why."""

    reason: str
