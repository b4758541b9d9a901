"""Tests, the tool loop, the engine and the rest use `WorkflowContext` through its public API.

A test that reads `ctx._journal` pins the context's private layout: the next change to it breaks
the test though nothing a user sees changed, and the test proves what the code does, not what a
workflow can observe. The same holds for the engine's own modules outside the context's package:
they use `ctx.internals`. This scan fails on any new reach into the context's private attributes.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTEXT_PACKAGE = ROOT / "libs" / "tianshu_core" / "context"
SCANNED = ["tests", "libs", "services", "bench", "examples"]

CLASS = "WorkflowContext"
# What a context is called where it carries no annotation: a workflow's `ctx`, a loop's `self.ctx`.
CONVENTIONAL_NAMES = {"ctx"}


def _private(attr: str) -> bool:
    return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))


def _names_the_class(annotation: ast.expr | None) -> bool:
    """An annotation that is the context's class (`WorkflowContext`, `tianshu_core.WorkflowContext`,
    `"WorkflowContext"`, or either inside `X | None`/`Optional[X]`)."""
    if annotation is None:
        return False
    for node in ast.walk(annotation):
        if isinstance(node, ast.Name) and node.id == CLASS:
            return True
        if isinstance(node, ast.Attribute) and node.attr == CLASS:
            return True
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and CLASS in node.value:
            return True
    return False


def _contexts(tree: ast.AST) -> set[str]:
    """The names that hold a context in this file: the conventional ones and any annotated so."""
    names = set(CONVENTIONAL_NAMES)
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and _names_the_class(node.annotation):
            names.add(node.arg)
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and _names_the_class(node.annotation)
        ):
            names.add(node.target.id)
    return names


def _is_context(node: ast.expr, names: set[str]) -> bool:
    """`node` is a context: one of `names`, an attribute so named (`self.ctx`), or `ctx.internals`."""
    if isinstance(node, ast.Name):
        return node.id in names
    if isinstance(node, ast.Attribute):
        return node.attr in names or (node.attr == "internals" and _is_context(node.value, names))
    return False


def private_accesses(source: str, filename: str = "<source>") -> list[str]:
    """Each place in `source` that reads or writes a private attribute of a context, as
    `file:line: expression`."""
    tree = ast.parse(source, filename)
    names = _contexts(tree)
    found: list[str] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.expr):
            continue
        if _reads_a_private_attribute(node, names) or _names_a_private_attribute(node, names):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
    return found


def _reads_a_private_attribute(node: ast.expr, names: set[str]) -> bool:
    """`ctx._x`."""
    return isinstance(node, ast.Attribute) and _private(node.attr) and _is_context(node.value, names)


def _names_a_private_attribute(node: ast.expr, names: set[str]) -> bool:
    """`getattr(ctx, "_x")` and its kin."""
    return (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
        and len(node.args) >= 2
        and _is_context(node.args[0], names)
        and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str)
        and _private(node.args[1].value)
    )


def test_nothing_outside_the_context_package_reaches_into_a_context() -> None:
    found: list[str] = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if CONTEXT_PACKAGE in path.parents or ".venv" in path.parts:
                continue
            source = path.read_text()
            if CLASS in source or any(name in source for name in CONVENTIONAL_NAMES):
                found += private_accesses(source, str(path.relative_to(ROOT)))
    assert found == [], "use the context's public API (or ctx.internals) instead:\n" + "\n".join(found)


def test_the_scan_finds_each_form_of_a_reach_into_a_context() -> None:
    source = """
async def wf(ctx):
    return ctx._run.clock.now()

async def typed(context: WorkflowContext) -> None:
    context._journal.records.clear()

async def qualified(c: "tianshu_core.WorkflowContext | None") -> None:
    c._stage_prefix = "x/"

class Loop:
    def name(self) -> int:
        return self.ctx._generation["n"]

def later(ctx):
    return getattr(ctx, "_deferred"), ctx.internals._ctx
"""
    lines = sorted(int(hit.split(":")[1]) for hit in private_accesses(source))
    assert lines == [3, 6, 9, 13, 16, 16]


def test_the_scan_leaves_everything_else_alone() -> None:
    source = """
async def wf(ctx: WorkflowContext, embedded: Embedded) -> None:
    ctx.case.case_key, ctx.internals.now(), ctx.__class__, type(ctx)._private_of_the_type
    embedded._run(["stop"])
    getattr(ctx, "case"), getattr(embedded, "_run")

class Follower:
    def start(self) -> None:
        self._run(), self._task, self.context._x
"""
    assert private_accesses(source) == []
