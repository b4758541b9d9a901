"""The base classes of every wire model: unknown fields rejected, a `kind` tag required on the wire."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from pydantic_core import PydanticCustomError

from .tokens import MAX_TOKEN_LENGTH, PLAIN_TOKEN_PATTERN

CaseKey = Annotated[
    str,
    Field(
        pattern=PLAIN_TOKEN_PATTERN,
        max_length=MAX_TOKEN_LENGTH,
        description="A case key: 1-200 characters of A-Z, a-z, 0-9, '_' or '-' (it travels in subjects).",
    ),
]
"""A case key is a plain subject token, so it can stand in `tianshu.v1.cases.<case_key>.…`."""

CallId = Annotated[
    str,
    Field(
        pattern=PLAIN_TOKEN_PATTERN,
        max_length=MAX_TOKEN_LENGTH,
        description="A tool or model call's durable id: 1-200 characters of A-Z, a-z, 0-9, '_' or '-' "
        "(the scheduler's are digests; it travels in subjects and in `Nats-Msg-Id`).",
    ),
]
"""A call id is a plain token: it stands in `tianshu.v1.llm.stream.<case_key>.<call_id>`, and two
ids never map to one `Nats-Msg-Id`."""

Name = Annotated[str, Field(min_length=1, max_length=200)]
"""A short identifier: a workflow code, a session id."""


class WireModel(BaseModel):
    """A value nested in a message: immutable, unknown fields rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def _require_kind_in_schema(schema: dict[str, Any]) -> None:
    required: list[str] = schema.setdefault("required", [])
    if "kind" not in required:
        required.insert(0, "kind")
    schema["properties"]["kind"].pop("default", None)


class Message(WireModel):
    """A top-level message: it carries a `kind` tag naming its type.

    In Python the tag defaults to the class's own kind, so `StartCase(workflow_code="x")` works;
    on the wire (JSON) it is required, so every message says what it is and a second kind can
    join a subject later without making old messages ambiguous.
    """

    model_config = ConfigDict(json_schema_extra=_require_kind_in_schema)

    KIND: ClassVar[str]

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        field = cls.model_fields.get("kind")
        if field is None or not isinstance(field.default, str):
            raise TypeError(f"{cls.__name__} needs a `kind: Literal[...]` field with its tag as the default")
        cls.KIND = field.default

    # After the fields, not before: a `before` validator makes pydantic build the whole decoded
    # JSON as Python objects first, which made decoding a model call's result take 40% longer.
    @model_validator(mode="after")
    def _kind_required_on_the_wire(self, info: ValidationInfo) -> Self:
        if info.mode == "json" and "kind" not in self.model_fields_set:
            raise PydanticCustomError(
                "missing_kind", "the message has no 'kind' tag (expected {kind})", {"kind": self.KIND}
            )
        return self
