"""Example tools: what `TIANSHU_TOOLS=examples.tools` serves from a tool runner.

`lookup` is read-only, so the calls of one model reply to it run in parallel; `save_note`
changes things, so it runs alone.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from tianshu_core.tools import ToolRegistry, ToolSafety, tool

_CATALOGUE = {
    "gpu": "8x H100 nodes: 32,000 USD a month each",
    "storage": "object storage: 21 USD per TB a month",
}
_NOTES: list[str] = []


@tool(safety=ToolSafety.READ_ONLY)
async def lookup(item: Annotated[str, Field(description="What to price, e.g. 'gpu'.")]) -> str:
    """Look an item up in the price catalogue."""
    return _CATALOGUE.get(item.lower(), f"no catalogue entry for {item!r}")


@tool(safety=ToolSafety.EXCLUSIVE)
async def save_note(text: Annotated[str, Field(description="The note to keep.", max_length=2000)]) -> str:
    """Keep a note for the reviewer."""
    _NOTES.append(text)
    return f"note {len(_NOTES)} saved"


tools = ToolRegistry([lookup, save_note])
