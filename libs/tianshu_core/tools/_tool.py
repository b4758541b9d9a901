"""What a tool is: the `Tool` protocol, `BaseTool` for hand-written tools, and the `@tool` decorator."""

from __future__ import annotations

import abc
import asyncio
import enum
import inspect
import re
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, overload, runtime_checkable

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from tianshu_contracts.llm import ToolSpec

from .. import serde
from ..errors import TianshuError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
EMPTY_OBJECT_SCHEMA: dict[str, Any] = {"type": "object", "properties": {}}
_MAX_PROBLEMS = 5


class ToolSafety(enum.StrEnum):
    """Whether a tool may run beside others in one round.

    READ_ONLY tools have no effect another call could observe, so consecutive read-only calls of
    one round run in parallel. EXCLUSIVE tools (the default) run alone.
    """

    READ_ONLY = "read_only"
    EXCLUSIVE = "exclusive"


class ToolDefinitionError(TianshuError):
    """A tool cannot be defined or registered: bad name, bad schema, unsupported signature, duplicate."""

    code = "tool_definition"


@runtime_checkable
class Tool(Protocol):
    """A tool the model can call: name, description, safety, parameters schema and `execute`.

    `execute` receives the arguments already checked against `parameters_schema` and returns the
    text the model reads. Raising is fine: the executor turns it into an error result.
    """

    @property
    def name(self) -> str: ...
    @property
    def description(self) -> str: ...
    @property
    def safety(self) -> ToolSafety: ...
    @property
    def parameters_schema(self) -> dict[str, Any]: ...

    async def execute(self, arguments: dict[str, Any]) -> str: ...


class BaseTool(abc.ABC):
    """A base for hand-written tools: set the class attributes, implement `execute`.

        class Lookup(BaseTool):
            name = "lookup"
            description = "Look up a customer by id."
            safety = ToolSafety.READ_ONLY
            parameters_schema = {"type": "object", "properties": {"id": {"type": "string"}},
                                 "required": ["id"]}

            async def execute(self, arguments: dict[str, Any]) -> str: ...

    Arguments are validated against `parameters_schema` (JSON Schema 2020-12) before `execute`.
    `timeout_s`, when set, caps how long one call may run.
    """

    name: str
    description: str = ""
    safety: ToolSafety = ToolSafety.EXCLUSIVE
    parameters_schema: dict[str, Any] = EMPTY_OBJECT_SCHEMA
    timeout_s: float | None = None

    _validator: Draft202012Validator | None = None

    @abc.abstractmethod
    async def execute(self, arguments: dict[str, Any]) -> str:
        """Run the tool; the returned text goes to the model."""

    def check_arguments(self, arguments: dict[str, Any]) -> str | None:
        """What is wrong with `arguments`, or None when they are valid."""
        if self._validator is None:
            self._validator = Draft202012Validator(self.parameters_schema)
        return schema_problem(self._validator, arguments)


class FunctionTool(BaseTool):
    """A tool made from a typed function by `@tool`; calling it calls the function.

    The parameters' model is built from the signature (or is the single pydantic-model
    parameter), so the schema and the validation come from the same types.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        safety: ToolSafety = ToolSafety.EXCLUSIVE,
        timeout_s: float | None = None,
    ) -> None:
        self.fn = fn
        self.name = name or fn.__name__
        self.description = description if description is not None else inspect.cleandoc(fn.__doc__ or "")
        self.safety = ToolSafety(safety)
        self.timeout_s = timeout_s
        self.model, self._whole = _arguments_model(fn, self.name)
        self.parameters_schema = _clean_schema(self.model.model_json_schema())
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<FunctionTool {self.name} ({self.safety.value})>"

    def check_arguments(self, arguments: dict[str, Any]) -> str | None:
        """What pydantic finds wrong with `arguments`, or None."""
        try:
            self.model.model_validate(arguments)
        except ValidationError as exc:
            return validation_problem(exc)
        return None

    async def execute(self, arguments: dict[str, Any]) -> str:
        """Validate `arguments` into the function's types and call it (a sync one in a thread)."""
        values = self.model.model_validate(arguments)
        if self._whole:
            args: tuple[Any, ...] = (values,)
            kwargs: dict[str, Any] = {}
        else:
            args, kwargs = (), {field: getattr(values, field) for field in type(values).model_fields}
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(*args, **kwargs)
        else:
            result = await asyncio.to_thread(self.fn, *args, **kwargs)
            if inspect.isawaitable(result):
                result = await result
        return result if isinstance(result, str) else serde.dumps(result)


AnyFn = Callable[..., Awaitable[Any]] | Callable[..., Any]


@overload
def tool(fn: AnyFn, /) -> FunctionTool: ...
@overload
def tool(
    *,
    name: str | None = None,
    description: str | None = None,
    safety: ToolSafety = ToolSafety.EXCLUSIVE,
    timeout_s: float | None = None,
) -> Callable[[AnyFn], FunctionTool]: ...


def tool(
    fn: AnyFn | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    safety: ToolSafety = ToolSafety.EXCLUSIVE,
    timeout_s: float | None = None,
) -> FunctionTool | Callable[[AnyFn], FunctionTool]:
    """Turn a typed function into a `Tool`, its parameters' JSON Schema included.

        @tool(safety=ToolSafety.READ_ONLY)
        async def search(query: str, limit: int = 5) -> str:
            '''Search the catalogue.'''

    The name defaults to the function's, the description to its docstring. Parameters come from
    the signature (describe them with `Annotated[str, Field(description=...)]`); a function whose
    only parameter is a pydantic model takes the model's fields as its arguments instead. A sync
    function runs in a worker thread. Non-text results are returned to the model as JSON.
    """

    def make(f: AnyFn) -> FunctionTool:
        made = FunctionTool(f, name=name, description=description, safety=safety, timeout_s=timeout_s)
        check_definition(made)
        return made

    return make(fn) if fn is not None else make


def check_definition(t: Tool) -> None:
    """Raise ToolDefinitionError when a tool's name or schema cannot be offered to a model."""
    if not _NAME.match(t.name):
        raise ToolDefinitionError(
            f"tool name {t.name!r} must be 1-64 characters of A-Z, a-z, 0-9, '_' or '-'"
        )
    try:
        Draft202012Validator.check_schema(t.parameters_schema)
    except SchemaError as exc:
        raise ToolDefinitionError(f"tool {t.name!r}: invalid parameters schema: {exc.message}") from exc
    if t.parameters_schema.get("type") != "object":
        raise ToolDefinitionError(f"tool {t.name!r}: its parameters schema must be of type 'object'")


def spec_of(t: Tool) -> ToolSpec:
    """What the model is shown of a tool."""
    return ToolSpec(name=t.name, description=t.description, parameters=t.parameters_schema)


def check_arguments(t: Tool, arguments: dict[str, Any]) -> str | None:
    """What is wrong with `arguments` for `t` (its own check, else its JSON Schema), or None."""
    if isinstance(t, BaseTool):
        return t.check_arguments(arguments)
    return schema_problem(Draft202012Validator(t.parameters_schema), arguments)


def schema_problem(validator: Draft202012Validator, instance: Any) -> str | None:
    """The JSON Schema errors of `instance`, as one line, or None."""
    errors = sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.absolute_path)))
    if not errors:
        return None
    parts = [f"{'/'.join(map(str, e.absolute_path)) or '(arguments)'}: {e.message}" for e in errors]
    return _join(parts)


def validation_problem(exc: ValidationError) -> str:
    """Pydantic's errors as one line: `field: message; ...`."""
    parts = [f"{'.'.join(map(str, e['loc'])) or '(arguments)'}: {e['msg']}" for e in exc.errors()]
    return _join(parts)


def _join(parts: list[str]) -> str:
    more = len(parts) - _MAX_PROBLEMS
    return "; ".join(parts[:_MAX_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")


def _arguments_model(fn: Callable[..., Any], name: str) -> tuple[type[BaseModel], bool]:
    """The pydantic model of `fn`'s arguments, and whether it is fn's single model parameter."""
    try:
        hints = inspect.get_annotations(fn, eval_str=True)
    except Exception as exc:
        raise ToolDefinitionError(f"tool {name!r}: cannot resolve its annotations ({exc})") from exc
    params = list(inspect.signature(fn).parameters.values())
    for p in params:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise ToolDefinitionError(
                f"tool {name!r}: parameter {p.name!r} is {p.kind.description}; "
                "a tool's parameters must be passable by name"
            )
    if len(params) == 1:
        only = hints.get(params[0].name)
        if inspect.isclass(only) and issubclass(only, BaseModel):
            return only, True
    fields: dict[str, Any] = {
        p.name: (hints.get(p.name, Any), ... if p.default is p.empty else p.default) for p in params
    }
    try:
        model = create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    except Exception as exc:
        raise ToolDefinitionError(f"tool {name!r}: cannot build its parameters model ({exc})") from exc
    return model, False


def _clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's generated titles: they repeat the names and cost the model tokens."""
    schema = dict(schema)
    schema.pop("title", None)
    props = schema.get("properties")
    if isinstance(props, dict):
        schema["properties"] = {
            k: {kk: vv for kk, vv in v.items() if kk != "title"} if isinstance(v, dict) else v
            for k, v in props.items()
        }
    return schema
