"""``POST /v1/completions``: OpenAI's legacy text completions (what lm-eval and other harnesses call).

The prompt is raw text (or token ids), continued as is: no harmony rendering of the prompt and no
harmony parsing of the output. Fields as OpenAI's: ``prompt`` (a string, a list of token ids, a list of
strings or a list of token-id lists; choice ``index`` = prompt index * ``n`` + j), ``max_tokens``
(default 16; 0 with ``echo`` scores the prompt only), ``stop`` (up to 16 strings: OpenAI's 4 is too few
for lm-eval), ``n``, ``echo``, ``logprobs`` (0..5 alternatives per token), the sampling fields of
:class:`~gptoss_jax.serving.api.Sampling`, ``stream`` (+ ``stream_options.include_usage``); ``suffix``
and ``best_of`` (other than 1 or ``n``) are refused.

Special tokens: a string prompt is encoded with every harmony special token recognised (the text
``<|start|>`` is token 200006, as vLLM does), so harmony-formatted prompts reach the model as it was
trained on them; generated special tokens are returned as their text (``<|channel|>``...), except the
stop token that ends the completion (``<|return|>``, ``<|call|>``): counted in usage and listed in
``logprobs`` (as vLLM: lm-eval expects one entry per token), not in the text. Token strings in
``logprobs`` that are not valid UTF-8 alone read ``bytes:\\xe6\\x9d``; ``text_offset`` indexes the
returned ``text``; a stop string keeps the entries of the tokens whose text is (partly) returned.

The request is parsed, checked and tokenized in the render workers
(:meth:`gptoss_jax.serving.prompts.Preparer.prepare_completions`, schema
:class:`gptoss_jax.serving.api.CompletionRequest`); this module holds the choices and the route.
"""
from __future__ import annotations

import time
import uuid

from fastapi import Depends, FastAPI, Request

from gptoss_jax.serving.api import DEFAULT_MAX_TOKENS, ApiError, CompletionRequest
from gptoss_jax.serving.streams import Endable, StopStrings, merge
from gptoss_jax.tokenizer import TextStream


def token_text(tokenizer, token: int) -> str:
    """A token as a logprobs string: its text, or ``bytes:\\xNN...`` when it is not UTF-8 on its own."""
    raw = tokenizer.decode_single_token_bytes(token)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TextChoice(Endable):
    """One generated text: the engine request, its incremental UTF-8 decoding (a character split over
    tokens comes out whole), stop strings, and the legacy logprobs entries of its tokens.

    echo: the prompt ids to prepend (as text), or None; logprobs: alternatives per token (None: no
    logprobs); drop: max_tokens 0 (the engine's one token is neither counted nor returned).
    """

    def __init__(self, index: int, request, tokenizer, stops: list[str], *, echo: list[int] | None,
                 logprobs: int | None, drop: bool = False):
        self.index, self.request, self.tokenizer = index, request, tokenizer
        self.k, self.echo, self.drop = logprobs, echo, drop
        self.stops, self.decoder = StopStrings(stops), TextStream(tokenizer)
        self.stop_ids = set(request.params.stop_token_ids)
        self.text = ""  # returned so far: the echoed prompt, then the completion (cut at a stop string)
        self.offset = 0  # characters decoded so far (before the stop-string cut): the next token's text_offset
        self.entries: list[tuple[str, float | None, dict | None, int]] = []  # (token, logprob, top, offset)
        self.sent = 0  # entries already streamed
        self.tokens = 0
        self.finish_reason: str | None = None


    async def deltas(self):
        """Async iterator of text pieces (the echoed prompt first, once its logprobs are known); sets
        ``finish_reason``."""
        echoed = self.echo is None
        async for token in self.request.aiter():
            if not echoed:
                echoed = True
                yield self._echo()
            if self.drop:
                continue
            self.tokens += 1
            if self.k is not None:  # (a stop token too: usage and logprobs count the same tokens, as vLLM)
                self.entries.append(self._entry(token, self.request.logprobs[self.tokens - 1], self.offset))
            if token in self.stop_ids:  # ends the completion: not in the text
                continue
            if text := self._add(self.decoder.push(token)):
                yield text
            if self.stops.hit:
                self.request.cancel()
                break
        if not echoed:
            yield self._echo()
        if text := self._add(self.decoder.flush()) + self._keep(self.stops.flush()):
            yield text
        self.finish_reason = self._reason()

    def _add(self, decoded: str) -> str:
        self.offset += len(decoded)
        return self._keep(self.stops.push(decoded))

    def _keep(self, text: str) -> str:
        self.text += text
        return text

    def _reason(self) -> str:
        reason = "stop" if self.stops.hit else self.request.finish_reason
        if reason == "error":
            raise ApiError(500, "generation failed (see the server log)", type_="server_error")
        if self.drop or (reason == "cancelled" and self.cut):
            return "length"
        return reason

    def _echo(self) -> str:
        """The prompt's text (and, with logprobs, its entries: the first token's logprob is null)."""
        if self.k is None:
            text = self.tokenizer.decode(self.echo, errors="replace")
        else:
            decoder, text = TextStream(self.tokenizer), ""
            given = self.request.prompt_logprobs or [None]
            for i, token in enumerate(self.echo):
                scored = given[i] if i < len(given) else None  # None: the first token (nothing before it)
                self.entries.append(self._entry(token, scored, len(text)) if scored
                                    else (token_text(self.tokenizer, token), None, None, len(text)))
                text += decoder.push(token)
            text += decoder.flush()
        self.offset = len(text)
        return self._keep(text)

    def _entry(self, token: int, logprob, offset: int) -> tuple:
        """(token text, logprob, {text: logprob} of the top ``k`` and the token itself, text offset)."""
        lp, top_ids, top_values = logprob
        top = {}
        for t, v in zip(top_ids[:self.k], top_values):
            top.setdefault(token_text(self.tokenizer, t), v)
        name = token_text(self.tokenizer, token)
        top.setdefault(name, lp)
        return name, lp, top, offset

    def logprobs_json(self, new_only: bool = False) -> dict | None:
        """OpenAI's legacy ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` of the tokens
        whose text is returned (those not yet streamed with ``new_only``), or None without logprobs."""
        if self.k is None:
            return None
        end = self.sent if new_only else 0
        if self.finish_reason is not None and not self.stops.hit:
            end = len(self.entries)
        while end < len(self.entries) and self.entries[end][3] < len(self.text):
            end += 1
        start = self.sent if new_only else 0
        self.sent = max(self.sent, end)
        tokens, lps, tops, offsets = zip(*self.entries[start:end]) if end > start else ((), (), (), ())
        return {"tokens": list(tokens), "token_logprobs": list(lps), "top_logprobs": list(tops),
                "text_offset": list(offsets)}

    def json(self) -> dict:
        return {"index": self.index, "text": self.text, "logprobs": self.logprobs_json(),
                "finish_reason": self.finish_reason}


def usage(prompts: list[list[int]], choices) -> dict:
    p, n = sum(map(len, prompts)), sum(c.tokens for c in choices)
    return {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def submit(server, body: CompletionRequest, prompts: list[list[int]]) -> list[TextChoice]:
    """``n`` engine requests per prompt; choice index = prompt index * n + j."""
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    choices = []
    try:
        for i, prompt in enumerate(prompts):
            server.check_length(prompt, "prompt")
            for j in range(body.n):
                choices.append(server.track(_choice(server, body, prompt, i * body.n + j, stops)))
    except (ValueError, ApiError) as e:  # ValueError: the engine refused the prompt
        server.release(choices)
        raise e if isinstance(e, ApiError) else ApiError(400, str(e), param="prompt") from None
    return choices


def _choice(server, body: CompletionRequest, prompt: list[int], index: int, stops: list[str]) -> TextChoice:
    limit = DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens  # (null: the default, as OpenAI)
    scores = body.logprobs is not None
    request = server.engine.submit(prompt, server.sampling(body, index, limit or 1), logprobs=scores,
                                   prompt_logprobs=scores and body.echo)  # max_tokens 0: one token, dropped
    return TextChoice(index, request, server.fmt.tokenizer, stops, logprobs=body.logprobs,
                      echo=prompt if body.echo else None, drop=limit == 0)


def add_completion_routes(app: FastAPI, server) -> None:
    """``/v1/completions``, streaming or not, on ``server`` (a :class:`gptoss_jax.serving.server.Server`)."""
    @app.post("/v1/completions", dependencies=[Depends(server.authorize)])
    async def completions(request: Request):
        body, prompts = await server.prepare(await request.body(), "completions")
        server.find_model(body.model)
        server.refuse_unsupported(body)
        choices = submit(server, body, prompts)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return server.streaming(completion_chunks(head, prompts, choices, include_usage), choices)
        await server.finish(request, choices)
        return {**head, "object": "text_completion", "choices": [c.json() for c in choices],
                "usage": usage(prompts, choices)}


async def completion_chunks(head: dict, prompts: list[list[int]], choices: list[TextChoice], include_usage: bool):
    """The text_completion chunks of a streamed completion: text pieces as they come, one final chunk per
    choice (finish_reason), then the usage (``include_usage``)."""
    def chunk(c: TextChoice, text: str, finish_reason=None) -> dict:
        choice = {"index": c.index, "text": text, "logprobs": c.logprobs_json(new_only=True),
                  "finish_reason": finish_reason}
        return {**head, "object": "text_completion", "choices": [choice]}

    async for i, text in merge([c.deltas() for c in choices]):
        yield chunk(choices[i], text)
    for c in choices:
        yield chunk(c, "", c.finish_reason)
    if include_usage:
        yield {**head, "object": "text_completion", "choices": [], "usage": usage(prompts, choices)}
