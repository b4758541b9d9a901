"""No test reaches into the private attributes of the scheduler or its driver.

The scheduler (`Scheduler`, `SchedulerHandlers`) and the service-mode driver (`ServiceDriver`) are
tested through their public calls, so that their insides can change while the tests keep saying
what they promise. This scans every test module for `x._name` (and `getattr(x, "_name")`) where
`x` is one of them: a name bound to one (built by its class or by a function annotated to return
one, or annotated as one), or a name or attribute called like one (`scheduler`, `driver`).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).parent
GUARDED = frozenset({"Scheduler", "SchedulerHandlers", "ServiceDriver"})
NAMED_LIKE = re.compile(r"scheduler|driver", re.IGNORECASE)


def _type_name(node: ast.expr | None) -> str | None:
    """The class an annotation or a call names (`Scheduler`, `service.Scheduler`, "Scheduler")."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.rsplit(".", 1)[-1]
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _bound_names(tree: ast.Module) -> set[str]:
    """The names this module binds to a guarded object."""
    factories = {
        f.name
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef) and _type_name(f.returns) in GUARDED
    }
    makers = GUARDED | factories
    bound: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and _type_name(node.annotation) in GUARDED:
            bound.add(node.arg)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            made = isinstance(node.value, ast.Call) and _type_name(node.value.func) in makers
            if made or _type_name(node.annotation) in GUARDED:
                bound.add(node.target.id)
        elif isinstance(node, ast.Assign | ast.NamedExpr):
            value = node.value
            if isinstance(value, ast.Await):
                value = value.value
            if isinstance(value, ast.Call) and _type_name(value.func) in makers:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                bound.update(t.id for t in targets if isinstance(t, ast.Name))
        elif (
            isinstance(node, ast.withitem)
            and isinstance(node.optional_vars, ast.Name)
            and isinstance(node.context_expr, ast.Call)
            and _type_name(node.context_expr.func) in makers
        ):
            bound.add(node.optional_vars.id)
    return bound


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_getattr(node: ast.AST) -> ast.expr | None:
    """The object of `getattr(obj, "_name")` (or setattr, hasattr, delattr); else None."""
    if not (
        isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id in {"getattr", "setattr", "hasattr", "delattr"}
        and len(node.args) >= 2
    ):
        return None
    name = node.args[1]
    if isinstance(name, ast.Constant) and isinstance(name.value, str) and _is_private(name.value):
        return node.args[0]
    return None


def private_reaches(source: str) -> list[tuple[int, str]]:
    """(line, expression) of every reach into a guarded object's private attributes."""
    tree = ast.parse(source)
    bound = _bound_names(tree)

    def guarded(node: ast.expr) -> bool:
        if isinstance(node, ast.Name):
            return node.id in bound or bool(NAMED_LIKE.search(node.id))
        if isinstance(node, ast.Attribute):
            return bool(NAMED_LIKE.search(node.attr))
        if isinstance(node, ast.Call):
            return _type_name(node.func) in GUARDED
        return False

    found: list[tuple[int, int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.expr):
            continue
        reached = node.value if isinstance(node, ast.Attribute) and _is_private(node.attr) else None
        reached = reached or _private_getattr(node)
        if reached is not None and guarded(reached):
            found.append((node.lineno, node.col_offset, ast.unparse(node)))
    return [(line, expr) for line, _, expr in sorted(found)]


def test_no_test_reaches_into_the_schedulers_private_attributes() -> None:
    found = [
        f"{path.relative_to(TESTS.parent)}:{line}: {expr}"
        for path in sorted(TESTS.rglob("*.py"))
        for line, expr in private_reaches(path.read_text())
    ]
    assert found == [], "tests reach into private attributes; use public calls:\n" + "\n".join(found)


def test_the_scan_finds_each_way_of_reaching_in() -> None:
    source = """
from tianshu_core.driver import ServiceDriver
from tianshu_scheduler.service import Scheduler

def make(engine) -> ServiceDriver:
    return ServiceDriver(engine)

async def case(settings, registry, engine, s: Scheduler, d: "ServiceDriver") -> None:
    x = Scheduler(settings, registry)
    y = make(engine)
    x._runs
    y._taken.clear()
    s._slots.acquire()
    d._stopping.set()
    s.driver._run_woken(None)
    getattr(x, "_chores")
    ServiceDriver(engine)._again
    self.scheduler._workers
    sched_driver._loops
"""
    found = [expr for _, expr in private_reaches(source)]
    assert found == [
        "x._runs",
        "y._taken",
        "s._slots",
        "d._stopping",
        "s.driver._run_woken",
        "getattr(x, '_chores')",
        "ServiceDriver(engine)._again",
        "self.scheduler._workers",
        "sched_driver._loops",
    ]


def test_the_scan_leaves_public_calls_and_other_objects_alone() -> None:
    source = """
async def case(scheduler, driver, ctx, engine) -> None:
    scheduler.engine
    driver.running
    driver.__class__
    ctx._journal
    engine._sweep_after
    await driver.shutdown(0)
"""
    assert private_reaches(source) == []
