"""The OpenAI chat-completions request schema and errors, shared by the server and its render workers.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

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


class ChatCompletionRequest(BaseModel):
    """The fields we act on; other OpenAI fields are accepted and ignored, except those in
    :data:`NEUTRAL_VALUES`, which would change the answer: set to anything but a neutral value they are
    refused rather than ignored."""
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=MAX_INT32)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    max_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_INT32)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None  # or a named function
    response_format: dict[str, Any] | None = None  # text, json_object, json_schema (serving/constrain.py)
    reasoning_effort: Literal["low", "medium", "high"] | None = None

    def unsupported(self) -> tuple[str, Any] | None:
        """(field, value) of the first field set to a value this server cannot honour, or None."""
        fmt = self.response_format
        if fmt is not None and fmt.get("type") not in ("text", "json_object", "json_schema"):
            return "response_format", fmt
        extra = self.model_extra or {}
        return next(((name, extra[name]) for name, honoured in NEUTRAL_VALUES.items()
                     if name in extra and not honoured(extra[name])), None)


#: OpenAI fields that would change the answer, each with a test of the (neutral) values this server honours.
NEUTRAL_VALUES = {
    "logprobs": lambda v: v in (None, False),
    "top_logprobs": lambda v: v in (None, 0),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
}
