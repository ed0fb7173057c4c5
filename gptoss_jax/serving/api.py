"""The OpenAI request schemas (chat completions, completions, responses) and errors, shared by the server
and its render workers.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: seeds are threefry keys of 63 bits (``SamplingParams.seed``); top_k and token counts fit int32
MAX_SEED = 2**63 - 1
MAX_INT32 = 2**31 - 1


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self):
        from starlette.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status)

    @classmethod
    def from_body(cls, status: int, body: dict) -> "ApiError":
        e = body["error"]
        return cls(status, e["message"], type_=e["type"], param=e["param"], code=e["code"])


def validation_error(errors: list[dict]) -> ApiError:
    """A 400 for pydantic's (or FastAPI's) validation errors; ``param`` names the first field."""
    errors = errors or [{"msg": "invalid request body"}]
    if errors[0].get("type") == "json_invalid":
        return ApiError(400, f"The body is not valid JSON: {errors[0].get('ctx', {}).get('error', '')}")
    where = [".".join(str(x) for x in err.get("loc", ()) if x != "body") for err in errors]
    msg = "; ".join(f"{w or 'body'}: {err.get('msg')}" for w, err in zip(where, errors))
    return ApiError(400, msg, param=where[0] or None)


class StreamOptions(BaseModel):
    include_usage: bool = False


#: logprobs alternatives per token at most (OpenAI's top_logprobs bound; the sampler computes this many)
MAX_TOP_LOGPROBS = 20
#: logit_bias entries at most (OpenAI's limit; SamplingParams.logit_bias)
MAX_LOGIT_BIAS = 300


class Refusing(BaseModel):
    """The fields we act on; other OpenAI fields are accepted and ignored, except those in ``NEUTRAL``
    (name -> test of the neutral values), which would change the answer: set to anything but a neutral
    value they are refused rather than ignored."""
    model_config = ConfigDict(extra="allow")
    NEUTRAL: ClassVar[dict] = {}

    def unsupported(self) -> tuple[str, Any] | None:
        """(field, value) of the first field set to a value this server cannot honour, or None."""
        fmt = getattr(self, "response_format", None)
        if fmt is not None and fmt.get("type") not in ("text", "json_object", "json_schema"):
            return "response_format", fmt
        extra = self.model_extra or {}
        return next(((name, extra[name]) for name, honoured in self.NEUTRAL.items()
                     if name in extra and not honoured(extra[name])), None)


class Sampling(Refusing):
    """Sampling fields shared by chat completions and completions."""

    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT32)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS)

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias in [-100, 100]) pairs; ApiError for a bad key or value."""
        pairs = []
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or not -100 <= value <= 100:
                raise ApiError(400, f"logit_bias: expected token ids (decimal strings) mapped to numbers in "
                                    f"[-100, 100], got {key!r}: {value!r}", param="logit_bias")
            pairs.append((int(key), float(value)))
        return tuple(pairs)


class ChatCompletionRequest(Sampling):
    """A chat completion (see :class:`Refusing` for fields outside the schema)."""

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None  # or a named function
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (serving/constrain.py)
    reasoning_effort: Literal["low", "medium", "high"] | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


#: legacy completions: OpenAI's default max_tokens and logprobs bound; stop strings: OpenAI allows 4, but
#: lm-eval's local-completions sends a task's stop sequences plus the EOS text uncut (vLLM takes any number)
DEFAULT_MAX_TOKENS = 16
MAX_LOGPROBS = 5
MAX_STOPS = 16


class CompletionRequest(Sampling):
    """A legacy text completion (see :class:`Refusing` for fields outside the schema); ``prompt`` is checked
    in the render worker (:meth:`gptoss_jax.serving.prompts.Preparer.prepare_completions`)."""

    NEUTRAL = {"suffix": lambda v: v in (None, "")}

    model: str
    prompt: Any  # str | list[int] | list[str] | list[list[int]] (prompts.prompt_list)
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, ge=0, le=MAX_INT32)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_bool(cls, value):
        """``false`` (a chat-style client) is no logprobs; ``true`` is not a count."""
        if value is True:
            raise ValueError("expected the number of alternatives per token, 0 to 5, not true")
        return None if value is False else value

    def unsupported(self):
        best_of = (self.model_extra or {}).get("best_of")
        if best_of not in (None, 1, self.n):  # best_of == n: every candidate is returned, as n alone
            return "best_of", best_of
        return super().unsupported()
