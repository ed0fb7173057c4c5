"""A chat-completions request body (untrusted bytes) -> the validated request and its prompt ids (text
completions likewise: :meth:`Preparer.prepare_completions`).

Runs in the server's render workers (:mod:`gptoss_jax.serving.workers`): parsing, validation, the
cheap bounds below and harmony rendering never run on the event loop. In order:

1. JSON (``NaN``/``Infinity`` refused), then the schema (:class:`ChatCompletionRequest`);
2. every string in the body must be valid Unicode (a lone surrogate such as ``"\\ud83d"`` is named by
   its field, e.g. ``messages[0].content``);
3. a lower bound on the prompt's length, before tokenizing: no o200k token is longer than 128 bytes,
   so a text of ``b`` UTF-8 bytes is at least ``b // 128`` tokens, and each user or tool message adds at
   least 4 (``<|start|>``, role, ``<|message|>``, ``<|end|>``). Reasoning of earlier turns, which
   harmony may drop, is not counted. A bound at the context or above is ``context_length_exceeded``;
4. :meth:`ChatFormat.render` (long runs of characters tokenized in linear time).
"""
from __future__ import annotations

import json

from gptoss_jax.harmony import ChatFormat, ChatFormatError
from gptoss_jax.serving import responses
from gptoss_jax.serving.api import MAX_STOPS, ApiError, ChatCompletionRequest, CompletionRequest
from gptoss_jax.serving.validate import MAX_TOKEN_BYTES, _field, check_unicode, least_tokens, parse
from gptoss_jax.tokenizer import N_VOCAB, encode_special

MAX_CHOICES = 128      # a completion's prompts x n at most (each is one engine request)


def bad_prompt(message: str) -> ApiError:
    return ApiError(400, f"prompt: {message}", param="prompt")


def prompt_list(prompt) -> list[str | list[int]]:
    """The prompts of a request's ``prompt`` (each a non-empty string or list of token ids); ApiError 400."""
    def ids(value) -> bool:
        return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)

    if isinstance(prompt, str) or (ids(prompt) and prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (ids(p) and p) for p in prompt):
        prompts = prompt
    else:
        raise bad_prompt("expected a non-empty string, list of token ids, list of strings or list of token-id "
                         f"lists, got {json.dumps(prompt)[:100]}")
    for i, p in enumerate(prompts):
        if p == "":
            raise bad_prompt("is empty" if len(prompts) == 1 else f"prompt {i} is empty")
        if not isinstance(p, str) and (bad := next((t for t in p if not 0 <= t < N_VOCAB), None)) is not None:
            raise bad_prompt(f"token id {bad} is outside the vocabulary [0, {N_VOCAB})")
    return prompts


def too_long(context: int, n: int, least: bool = False) -> ApiError:
    return ApiError(400, f"This model's maximum context length is {context} tokens, but the prompt takes "
                         f"{'at least ' if least else ''}{n} tokens", param="prompt", code="context_length_exceeded")


class Preparer:
    """The worker's handler: ``preparer((kind, raw, *extra))`` -> ``("ok", request, prompt ids)`` or
    ``("error", status, error body)``; ``kind`` names the endpoint's method in :attr:`KINDS`, which
    takes ``raw`` and ``extra``."""

    KINDS = {"chat": "prepare_chat", "completions": "prepare_completions", "responses": "prepare_responses"}

    def __init__(self, vocab: str | None, context: int, reasoning_effort: str):
        self.fmt, self.context, self.reasoning_effort = ChatFormat(vocab), context, reasoning_effort

    def __call__(self, payload: tuple):
        kind, raw, *extra = payload
        try:
            return ("ok", *getattr(self, self.KINDS[kind])(raw, *extra))
        except ApiError as e:
            return "error", e.status, e.body()

    def prepare_chat(self, raw: bytes) -> tuple[ChatCompletionRequest, list[int]]:
        """A chat completion: the request without messages/tools and its rendered prompt."""
        obj, body = parse(raw)
        check_unicode(obj)
        try:
            if (least := least_tokens(body)) >= self.context:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the "
                                    f"messages take at least {least} tokens", param="messages",
                               code="context_length_exceeded")
            prompt = self.fmt.render(body.messages, tools=None if body.tool_choice == "none" else body.tools,
                                     reasoning_effort=body.reasoning_effort or self.reasoning_effort)
        except ChatFormatError as e:
            raise ApiError(400, str(e), param=_field(str(e))) from None
        constrained = body.tool_choice == "required" or isinstance(body.tool_choice, dict)
        return body.model_copy(update={"messages": [], "tools": body.tools if constrained else None}), prompt

    def prepare_completions(self, raw: bytes) -> tuple[CompletionRequest, list[list[int]]]:
        """A text completion: the request (without its prompt) and the ids of each prompt, harmony special
        tokens recognised (:func:`encode_special`); a text that cannot fit (step 3) is refused untokenized."""
        obj, body = parse(raw, CompletionRequest)
        check_unicode(obj)
        prompts = prompt_list(body.prompt)
        if len(prompts) * body.n > MAX_CHOICES:
            raise bad_prompt(f"{len(prompts)} prompts x n={body.n} is over this server's {MAX_CHOICES} choices")
        if isinstance(body.stop, list) and len(body.stop) > MAX_STOPS:
            raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(body.stop)}", param="stop")
        out = []
        for p in prompts:
            if isinstance(p, str) and (least := len(p.encode("utf-8")) // MAX_TOKEN_BYTES) >= self.context:
                raise too_long(self.context, least, least=True)
            ids = encode_special(self.fmt.tokenizer, p) if isinstance(p, str) else p
            if len(ids) >= self.context:
                raise too_long(self.context, len(ids))
            out.append(ids)
        return body.model_copy(update={"prompt": None}), out

    def prepare_responses(self, raw: bytes, history: list | None = None):
        """A Responses request (:func:`gptoss_jax.serving.responses.prepare`; ``history``: the conversation
        of its ``previous_response_id``)."""
        return responses.prepare(self, raw, history)
