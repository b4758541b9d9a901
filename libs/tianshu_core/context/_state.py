"""Variables: case-scoped (journaled, replayed) and shared by the cases of a session."""

from __future__ import annotations

from typing import Any

from .. import serde
from ..models import JournalKind
from ._core import ContextCore
from ._signals import guard


class State(ContextCore):
    """`get_state`/`set_state` (the case's own) and `get_session_state`/`set_session_state`."""

    def get_state(self, name: str, default: Any = None) -> Any:
        """The case-scoped variable `name` (its latest value), or `default`."""
        text = self._journal.state.get(name)
        return default if text is None else serde.loads(text)

    def _state_text(self, what: str, name: str, value: Any) -> str:
        """The JSON text of a state variable's value; UnstorableValueError (naming the variable)
        for a name or value no store can keep."""
        serde.require_text(f"the name of {what} {name!r}", name)
        return serde.encode_result(f"{what} {name!r}", value, self._run.config.max_step_result_bytes)

    async def set_state(self, name: str, value: Any) -> None:
        """Set a case-scoped variable; a replay that writes the same value writes nothing."""
        text = self._state_text("state", name, value)
        if self._journal.state.get(name) == text:
            return
        await self._append(JournalKind.STATE, name, text)
        self._journal.state[name] = text
        data = serde.loads(text)
        await self._write(
            lambda: self._run.stores.state.save(self.case.case_key, name, data, token=self._run.token)
        )

    async def get_session_state(self, name: str, default: Any = None) -> Any:
        """A variable shared by the cases of this session (last write wins, no locking)."""
        entry = await guard(self._run.stores.state.get_session(self.case.session_id, name))
        return default if entry is None else entry.data

    async def set_session_state(self, name: str, value: Any) -> None:
        """Set a variable shared by the cases of this session."""
        data = serde.loads(self._state_text("session state", name, value))
        await self._write(
            lambda: self._run.stores.state.save_session(self.case.session_id, name, data, fence=self._fence)
        )
