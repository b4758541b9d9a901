"""Tianshu's wire contracts: every message that crosses NATS, and the subjects and streams it uses.

Messages are pydantic v2 models with a `kind` tag; each subject has a module-level `TypeAdapter`
(a discriminated union where several kinds share the subject). `subjects` names every subject and
stream; `catalog` says what travels where; `generate` writes the JSON Schema files and the AsyncAPI
document in `contracts/schemas/`. This package imports nothing from `tianshu_core`.
"""

from . import catalog, subjects, tokens
from ._base import CaseKey, Message, WireModel
from .cases import (
    CASE_COMMAND_ADAPTER,
    CASE_FINISHED_ADAPTER,
    CASE_UPDATED_ADAPTER,
    GET_CASE_ADAPTER,
    GET_CASE_REPLY_ADAPTER,
    START_CASE_ADAPTER,
    START_CASE_REPLY_ADAPTER,
    CancelCase,
    CaseCommand,
    CaseFinished,
    CaseFound,
    CaseNotFound,
    CaseSummary,
    CaseUpdated,
    ExecutionState,
    GetCase,
    GetCaseReply,
    LifecycleState,
    PauseCase,
    RequestRefused,
    ResumeCase,
    StartCase,
    StartCaseAccepted,
    StartCaseReply,
)
from .catalog import CHANNELS, EVENT_PAYLOAD_ADAPTER, MESSAGES, Channel
from .dead_letters import DEAD_LETTER_ADAPTER, REFUSAL_ADAPTER, DeadLetter, DeadLetterReason, Refusal
from .errors import WireError

__all__ = [
    "CASE_COMMAND_ADAPTER",
    "CASE_FINISHED_ADAPTER",
    "CASE_UPDATED_ADAPTER",
    "CHANNELS",
    "DEAD_LETTER_ADAPTER",
    "EVENT_PAYLOAD_ADAPTER",
    "GET_CASE_ADAPTER",
    "GET_CASE_REPLY_ADAPTER",
    "MESSAGES",
    "REFUSAL_ADAPTER",
    "START_CASE_ADAPTER",
    "START_CASE_REPLY_ADAPTER",
    "CancelCase",
    "CaseCommand",
    "CaseFinished",
    "CaseFound",
    "CaseKey",
    "CaseNotFound",
    "CaseSummary",
    "CaseUpdated",
    "Channel",
    "DeadLetter",
    "DeadLetterReason",
    "ExecutionState",
    "GetCase",
    "GetCaseReply",
    "LifecycleState",
    "Message",
    "PauseCase",
    "Refusal",
    "RequestRefused",
    "ResumeCase",
    "StartCase",
    "StartCaseAccepted",
    "StartCaseReply",
    "WireError",
    "WireModel",
    "catalog",
    "subjects",
    "tokens",
]
