"""The behaviour language: parsing scripts and steps, and the per-script request counters.

A script is steps joined by `+`; a step is `name[:arg][,opt=value...]`. The package docstring is
the reference; this module only turns the text into `Script` and `Step` values and says which
step the n-th request of a script runs.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

STEP_NAMES = frozenset(
    {"text", "tools", "length", "error", "too_long", "sse_error", "cut", "no_finish", "badkey"}
)
"""The steps a script may name."""

_INT_ARG_DEFAULTS: Mapping[str, int | None] = {
    "tools": 1,
    "length": 50,
    "error": None,  # required
    "sse_error": 1,
    "cut": 1,
}
_NO_ARG = frozenset({"text", "too_long", "no_finish"})
_FLOAT_OPTIONS = frozenset({"delay", "gap", "retry_after"})
_INT_OPTIONS = frozenset({"ctx", "retry_after_ms"})
_TEXT_OPTIONS = frozenset({"say", "text", "type", "message"})
_SHAPES = frozenset({"data", "event"})
_OPTIONS = _FLOAT_OPTIONS | _INT_OPTIONS | _TEXT_OPTIONS | {"deny", "cache", "shape"}


class ScriptError(ValueError):
    """A script that does not parse: an unknown step or option, or a bad value."""


def decode_words(value: str) -> str:
    """An option's text: `_` stands for a space and `%XX` for any byte (`%5F` is a real `_`)."""
    return unquote(value.replace("_", " "))


@dataclass(frozen=True)
class Step:
    """One step of a script: its name, its argument (text after `:`) and its options."""

    name: str
    arg: str | None = None
    options: Mapping[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        head = self.name if self.arg is None else f"{self.name}:{self.arg}"
        return ",".join([head, *(f"{k}={v}" for k, v in self.options.items())])

    @property
    def count(self) -> int:
        """The step's integer argument, or its default (`tools`: 1, `length`: 50, `cut`: 1...)."""
        if self.arg is None:
            return _INT_ARG_DEFAULTS.get(self.name) or 0
        return int(self.arg)

    def _float(self, name: str) -> float:
        return float(self.options.get(name, 0.0))

    @property
    def delay(self) -> float:
        """Seconds to wait before answering (`delay=S`)."""
        return self._float("delay")

    @property
    def gap(self) -> float:
        """Seconds to wait between two stream events (`gap=S`)."""
        return self._float("gap")

    @property
    def ctx(self) -> int | None:
        """The context budget in tokens (`ctx=M`), if the step sets one."""
        value = self.options.get("ctx")
        return None if value is None else int(value)

    @property
    def deny(self) -> frozenset[str]:
        """API keys answered with a 401 (`deny=K1|K2`, or the argument of `badkey:K1|K2`)."""
        keys = self.options.get("deny", "")
        if self.name == "badkey" and self.arg:
            keys = f"{keys}|{self.arg}"
        return frozenset(k for k in keys.split("|") if k)

    @property
    def cache(self) -> tuple[int, int]:
        """Cache-read and cache-write input tokens to report (`cache=R:W`)."""
        read, _, write = self.options.get("cache", "0:0").partition(":")
        return int(read or 0), int(write or 0)

    def _words(self, *names: str) -> str | None:
        value = next((self.options[name] for name in names if name in self.options), None)
        return None if value is None else decode_words(value)

    @property
    def say(self) -> str | None:
        """The reply text set by `say=WORDS` (or `text=WORDS`), decoded."""
        return self._words("say", "text")

    @property
    def message(self) -> str | None:
        """The error message set by `message=WORDS`, decoded."""
        return self._words("message")


DEFAULT_STEP = Step("text")


@dataclass(frozen=True)
class Script:
    """A parsed script: its source text (the counter's key) and its steps."""

    source: str
    steps: tuple[Step, ...]

    def step(self, n: int) -> Step:
        """The step request `n` (1-based) runs: step n, or the last one once they run out."""
        return self.steps[min(max(n, 1), len(self.steps)) - 1]


def _check_option(step_text: str, name: str, value: str) -> None:
    if name not in _OPTIONS:
        raise ScriptError(f"step {step_text!r}: unknown option {name!r}")
    try:
        if name in _FLOAT_OPTIONS and float(value) < 0:
            raise ScriptError(f"step {step_text!r}: {name} must not be negative")
        if name in _INT_OPTIONS and int(value) < 0:
            raise ScriptError(f"step {step_text!r}: {name} must not be negative")
        if name == "shape" and value not in _SHAPES:
            raise ScriptError(f"step {step_text!r}: shape is one of {', '.join(sorted(_SHAPES))}")
        if name == "cache":
            read, sep, write = value.partition(":")
            if not sep or int(read) < 0 or int(write) < 0:
                raise ScriptError(f"step {step_text!r}: cache wants R:W")
    except ValueError as exc:
        if isinstance(exc, ScriptError):
            raise
        raise ScriptError(f"step {step_text!r}: bad value {value!r} for {name}") from None


def _check_arg(step_text: str, name: str, arg: str | None) -> None:
    if name in _NO_ARG and arg is not None:
        raise ScriptError(f"step {step_text!r}: {name} takes no argument")
    if name == "badkey" and not arg:
        raise ScriptError(f"step {step_text!r}: badkey wants keys, badkey:K1|K2")
    if name in _INT_ARG_DEFAULTS:
        if arg is None:
            if _INT_ARG_DEFAULTS[name] is None:
                raise ScriptError(f"step {step_text!r}: {name} wants a number, {name}:N")
            return
        if not arg.isdigit():
            raise ScriptError(f"step {step_text!r}: {name} wants a number, not {arg!r}")
        if name == "error" and not 400 <= int(arg) <= 599:
            raise ScriptError(f"step {step_text!r}: error wants a status from 400 to 599")


def parse_step(text: str) -> Step:
    """One step, `name[:arg][,opt=value...]`; a ScriptError if it does not parse."""
    head, *opts = text.strip().split(",")
    name, sep, arg = head.strip().partition(":")
    if name not in STEP_NAMES:
        raise ScriptError(f"unknown step {name!r} in {text!r} (steps: {', '.join(sorted(STEP_NAMES))})")
    _check_arg(text, name, arg if sep else None)
    options: dict[str, str] = {}
    for opt in opts:
        key, eq, value = opt.strip().partition("=")
        if not eq:
            raise ScriptError(f"step {text!r}: option {opt!r} wants a value, {opt}=...")
        _check_option(text, key, value)
        options[key] = value
    return Step(name, arg if sep else None, options)


def parse_script(source: str) -> Script:
    """A script, steps joined by `+`; a ScriptError if any step does not parse."""
    if not source.strip():
        raise ScriptError("empty script")
    return Script(source, tuple(parse_step(part) for part in source.split("+")))


def is_script(model: str) -> bool:
    """Whether a model name is meant as a script: its first step names a known step."""
    first = model.split("+", 1)[0].split(",", 1)[0].split(":", 1)[0].strip()
    return first in STEP_NAMES


def script_for(model: str, header: str | None) -> Script:
    """The script a request runs: the header's when given, else the model name's, else `text`."""
    if header is not None:
        return parse_script(header)
    if is_script(model):
        return parse_script(model)
    return Script(model, (DEFAULT_STEP,))


class Counters:
    """How many requests each (api, script) has had; safe to use from several threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}

    def next(self, api: str, source: str) -> int:
        """Count one more request of `source` on `api`, and return its number (1-based)."""
        with self._lock:
            n = self._counts.get((api, source), 0) + 1
            self._counts[(api, source)] = n
            return n

    def clear(self) -> None:
        """Start every script over."""
        with self._lock:
            self._counts.clear()
