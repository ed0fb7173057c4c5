"""One generated chat answer (:class:`Choice`): the engine request, its harmony parser (reasoning, tool
calls), stop strings and logprobs entries; :func:`delta_json` turns its deltas into chat chunk deltas."""
from __future__ import annotations

from gptoss_jax.harmony import ChatFormat, Delta
from gptoss_jax.serving.api import ApiError
from gptoss_jax.serving.streams import Endable, StopStrings


class Choice(Endable):
    """One generated answer: the engine request, its harmony parser (reasoning, tool calls) and the
    content sent so far (cut at a stop string)."""

    def __init__(self, index: int, request, fmt: ChatFormat, stops: list[str], top_logprobs: int = 0):
        self.index, self.request = index, request
        self.tokenizer, self.top_logprobs = fmt.tokenizer, top_logprobs
        self.logprobs: list[dict] = []  # OpenAI logprobs.content entries of the content tokens
        self.sent_logprobs = 0  # entries already streamed
        self._held: list[dict] = []  # entries of tokens the parser holds (a header, or text it may give back)
        self.parser = fmt.parser()
        self.stops = StopStrings(stops)
        self.tokens = 0
        self.reasoning_tokens = 0  # text tokens of analysis messages
        self.content = ""
        self.finish_reason: str | None = None


    async def deltas(self):
        """Async iterator of Deltas (stop strings applied to the content); sets ``finish_reason``."""
        async for token in self.request.aiter():
            self.tokens += 1
            before = self.parser._kind
            deltas = [d for d in map(self._cut, self.parser.feed(token)) if d]
            self.reasoning_tokens += before == self.parser._kind == "reasoning"  # text, not the header
            self._attribute(token, deltas)
            for d in deltas:
                yield d
            if self.stops.hit:
                self.request.cancel()
                break
        for d in self.parser.finish():
            if d := self._cut(d):
                self._attribute(None, [d])
                yield d
        if rest := self.stops.flush():
            self.content += rest
            yield Delta("content", rest)
        reason = "stop" if self.stops.hit else self.request.finish_reason
        if reason == "cancelled" and self.cut:
            reason = "length"
        if reason == "error":
            raise ApiError(500, "generation failed (see the server log)", type_="server_error")
        self.finish_reason = "tool_calls" if reason == "stop" and self.parser.output.tool_calls else reason

    def _attribute(self, token: int | None, deltas: list[Delta]) -> None:
        """Keep the logprobs entry of ``token`` if it is content: text inside a final message, or text the
        parser held (headers that turned out not to be) and then gave out as content (None: finish)."""
        if getattr(self.request, "logprobs", None) is None:
            return
        if token is not None:
            self._held.append(self._entry(token, *self.request.logprobs[self.tokens - 1]))
        content = any(d.kind == "content" for d in deltas)
        if content and (token is None or self.parser._kind is None):
            self.logprobs += self._held
            self._held = []
        elif content:
            self.logprobs.append(self._held.pop())
            self._held = []
        elif self.parser._kind is not None or deltas:
            self._held = []

    def _token(self, token: int) -> dict:
        raw = self.tokenizer.decode_single_token_bytes(token)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}

    def _entry(self, token: int, logprob: float, top_ids: list[int], top_values: list[float]) -> dict:
        """An OpenAI logprobs.content entry: the token, its log-probability and the top alternatives."""
        top = [{**self._token(t), "logprob": v} for t, v in zip(top_ids[:self.top_logprobs], top_values)]
        return {**self._token(token), "logprob": logprob, "top_logprobs": top}

    def logprobs_json(self, new_only: bool = False) -> dict | None:
        """``{"content": [...]}`` (the entries not yet streamed with ``new_only``), or None without logprobs."""
        if getattr(self.request, "logprobs", None) is None:
            return None
        start = self.sent_logprobs if new_only else 0
        self.sent_logprobs = len(self.logprobs)
        return {"content": self.logprobs[start:]}

    def _cut(self, d: Delta) -> Delta | None:
        if d.kind != "content":
            return d
        text = self.stops.push(d.text)
        self.content += text
        return Delta("content", text) if text else None

    def message(self) -> dict:
        out = self.parser.output
        msg = {"role": "assistant", "content": self.content or (None if out.tool_calls else ""),
               "reasoning_content": out.reasoning or None}
        if out.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                 for c in out.tool_calls]
        return msg


def delta_json(d: Delta) -> dict:
    """A Delta as the ``delta`` of an OpenAI chat.completion.chunk."""
    if d.kind == "reasoning":
        return {"reasoning_content": d.text}
    if d.kind == "content":
        return {"content": d.text}
    if d.kind == "tool_call":
        return {"tool_calls": [{"index": d.index, "id": d.call.id, "type": "function",
                                "function": {"name": d.call.name, "arguments": ""}}]}
    return {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}
