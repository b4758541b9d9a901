"""The replay view of a case's journal, and what each of its records is."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from .. import serde
from ..errors import CorruptCheckpointError
from ..models import JournalEntry, JournalKind


class Journal:
    """The replay view of a case's journal: named records by generation, and case state."""

    def __init__(self, entries: Sequence[JournalEntry]) -> None:
        self.records: dict[tuple[str, int], JournalEntry] = {}
        self.state: dict[str, str] = {}
        self.cursors: dict[tuple[str, str], int] = defaultdict(int)
        self.clears: dict[str, int] = defaultdict(int)
        self.next_seq = 1
        for entry in entries:
            self.next_seq = max(self.next_seq, entry.seq + 1)
            kind = entry.kind
            if kind == JournalKind.STATE:
                self.state[entry.name] = entry.data
            elif kind == JournalKind.CLEAR:
                for name in decode(entry)["names"]:
                    self.clears[name] += 1
            elif kind != JournalKind.REPLAY:
                self.records[(entry.name, self.clears[entry.name])] = entry
                if kind == JournalKind.EVENT:
                    data = decode(entry)
                    if data.get("event_seq"):
                        key = (data["resource_type"], data["resource_id"])
                        self.cursors[key] = max(self.cursors[key], data["event_seq"])


# What a journal entry records, as a replay checks it against what the code asks for and as
# `NonDeterminismError` names it.
STEP = "a step"
EVENT = "an event wait"
TIMER = "a timer"
CHILD = "a child"
CHILDREN = "a children wait"
_RECORDED_AS: dict[str, str] = {JournalKind.STEP: STEP, JournalKind.EVENT: EVENT, JournalKind.TIMER: TIMER}


def recorded_as(entry: JournalEntry) -> str:
    """What `entry` records. Spawning a child and awaiting children share the kind `child`: an
    await records the children's outcomes (a JSON array), a spawn the child (an object)."""
    if entry.kind == JournalKind.CHILD:
        return CHILDREN if entry.data.lstrip().startswith("[") else CHILD
    return _RECORDED_AS.get(entry.kind, f"a {entry.kind} entry")


def decode(entry: JournalEntry) -> Any:
    """An entry's JSON data; `CorruptCheckpointError` for text that is not JSON."""
    try:
        return serde.loads(entry.data)
    except ValueError as exc:
        raise CorruptCheckpointError(entry.case_key, entry.name, f"not valid JSON ({exc})") from exc
