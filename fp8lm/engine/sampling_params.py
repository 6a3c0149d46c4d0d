"""Per-request sampling settings, with vLLM's names and defaults."""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from fp8lm.errors import FP8LMError


class SamplingParamsError(FP8LMError, ValueError):
    """An invalid sampling parameter; `param` names it (the server reports it as a 400)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


class RequestOutputKind(enum.Enum):
    """What each of a request's outputs holds (vLLM's names): everything so far, only what is new
    since its previous output, or nothing until it finishes (then everything)."""
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


# What one request may ask for: beyond these bounds it is refused (a 400 naming the bound), so that no
# request can stall the server compiling a constraint or grow it without bound.
MAX_CONSTRAINT_CHARS = 32_768   # a JSON schema's text, a regex, a grammar, the choices together
MAX_CHOICES = 1024
MAX_SCHEMA_DEPTH = 32
MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS = 64, 1024
MAX_LOGIT_BIAS = 1024           # tokens
MAX_STOP_TOKEN_IDS = 1024


def _json_depth(value) -> int:
    """How deeply lists and objects nest in a JSON value (iteratively: no recursion limit to hit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, depth = todo.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, depth)
            todo.extend((c, depth + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


@dataclass
class StructuredOutputsParams:
    """Exactly one constraint, by vLLM's field names: a JSON schema (`json`, a dict or its text),
    a regular expression, a list of choices, an EBNF (GBNF) or Lark grammar, or any JSON object."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def __post_init__(self) -> None:
        kinds = ("json", "regex", "choice", "grammar", "json_object")
        given = [k for k in kinds if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError("structured_outputs", f"give exactly one of json, regex, choice, grammar, "
                                                            f"json_object; got {given or 'none'}")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) for c in self.choice)):
            raise SamplingParamsError("structured_outputs", "choice must be a non-empty list of strings")
        if self.choice is not None and len(self.choice) > MAX_CHOICES:
            raise SamplingParamsError("structured_outputs", f"{len(self.choice)} choices; at most {MAX_CHOICES}")
        if isinstance(self.json, str):
            if len(self.json) > MAX_CONSTRAINT_CHARS:
                raise SamplingParamsError("structured_outputs", self._too_long(len(self.json)))
            try:
                self.json = json.loads(self.json)
            except RecursionError:
                raise SamplingParamsError("structured_outputs", f"the JSON schema nests deeper than "
                                                                f"{MAX_SCHEMA_DEPTH} levels") from None
            except ValueError as e:
                raise SamplingParamsError("structured_outputs", f"the JSON schema is not JSON: {e}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise SamplingParamsError("structured_outputs", "a JSON schema must be an object")
        self._check_size()

    def _check_size(self) -> None:
        if self.json is not None and _json_depth(self.json) > MAX_SCHEMA_DEPTH:
            raise SamplingParamsError("structured_outputs", f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        text = json.dumps(self.json) if self.json is not None else self.regex or self.grammar or ""
        size = len(text) + sum(len(c) for c in self.choice or [])
        if size > MAX_CONSTRAINT_CHARS:
            raise SamplingParamsError("structured_outputs", self._too_long(size))

    @staticmethod
    def _too_long(size: int) -> str:
        return f"the constraint has {size} characters; at most {MAX_CONSTRAINT_CHARS}"


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16        # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None        # top-k logprobs per generated token
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None              # token id -> added to its logit
    structured_outputs: StructuredOutputsParams | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            ("n", self.n >= 1, "must be at least 1"),
            ("temperature", self.temperature >= 0, "must be non-negative"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1 (disabled) or at least 1"),
            ("min_p", 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be greater than 0"),
            ("max_tokens", self.max_tokens is None or self.max_tokens >= 1, "must be at least 1"),
            ("min_tokens", self.min_tokens >= 0, "must be non-negative"),
            ("min_tokens", self.max_tokens is None or self.min_tokens <= self.max_tokens,
             "must not exceed max_tokens"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be non-negative"),
            ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, "must be non-negative"),
            ("stop", all(isinstance(s, str) and s for s in self.stop_strings), "must be non-empty strings"),
            ("stop", len(self.stop_strings) <= MAX_STOP_STRINGS, f"at most {MAX_STOP_STRINGS} strings"),
            ("stop", all(len(s) <= MAX_STOP_STRING_CHARS for s in self.stop_strings),
             f"each at most {MAX_STOP_STRING_CHARS} characters"),
            ("stop_token_ids", len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, f"at most {MAX_STOP_TOKEN_IDS} ids"),
            ("logit_bias", all(-100 <= b <= 100 for b in (self.logit_bias or {}).values()),
             "values must be in [-100, 100]"),
            ("logit_bias", len(self.logit_bias or {}) <= MAX_LOGIT_BIAS, f"at most {MAX_LOGIT_BIAS} tokens"),
            ("output_kind", isinstance(self.output_kind, RequestOutputKind), "must be a RequestOutputKind"),
        ]
        for name, ok, message in checks:
            if not ok:
                got = repr(getattr(self, name))
                raise SamplingParamsError(name, f"{message}, got {got if len(got) <= 80 else got[:77] + '...'}")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)
