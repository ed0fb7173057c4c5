"""Streaming generation to a terminal: harmony chat (reasoning apart from the answer) or raw text."""
from __future__ import annotations

import dataclasses
import sys
import time

from gptoss_jax.harmony import ChatFormat, Delta, Output
from gptoss_jax.tokenizer import TextStream

DIM, RESET = "\033[2m", "\033[0m"


@dataclasses.dataclass
class Result:
    output: Output
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    def summary(self) -> str:
        rate = self.completion_tokens / self.seconds if self.seconds else 0.0
        return (f"[{self.prompt_tokens} prompt + {self.completion_tokens} generated tokens, {rate:.1f} tokens/s, "
                f"finish: {self.finish_reason}]")


class Printer:
    """Writes deltas as they come: the answer (and tool calls) to ``out``, reasoning to ``err`` (dimmed on a
    terminal, labelled 'thinking'), so ``> file`` keeps only the answer."""

    def __init__(self, out=None, err=None, show_reasoning: bool = True):
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.show_reasoning = show_reasoning
        self._last = None

    def __call__(self, delta: Delta) -> None:
        if delta.kind == "reasoning":
            if not self.show_reasoning:
                return
            dim = self.err.isatty()
            if self._last != "reasoning":
                self.err.write(f"{DIM if dim else ''}thinking: ")
            self.err.write(f"{DIM}{delta.text}{RESET}" if dim else delta.text)
            self.err.flush()
        else:
            if self._last == "reasoning" and self.show_reasoning:
                self.err.write("\n")
                self.err.flush()
            if delta.kind == "tool_call":
                self.out.write(("" if self._last is None else "\n") + f"[tool call {delta.call.name}] ")
            self.out.write(delta.text)
            self.out.flush()
        self._last = delta.kind

    def end(self, result: Result) -> None:
        if self._last is not None:
            (self.err if self._last == "reasoning" else self.out).write("\n")
        self.out.flush()
        self.err.write(result.summary() + "\n")
        self.err.flush()
        self._last = None


def _run(engine, prompt: list[int], params, on_token) -> tuple[str, int, float]:
    """Submit and drive one request; Ctrl-C cancels it. Returns (finish_reason, tokens, seconds)."""
    t0 = time.perf_counter()
    req = engine.submit(prompt, params)
    n = 0
    try:
        for token in req:
            n += 1
            on_token(token)
    except KeyboardInterrupt:
        req.cancel()
    return req.finish_reason, n, time.perf_counter() - t0


def stream_chat(engine, fmt: ChatFormat, messages: list[dict], params, printer: Printer, **render) -> Result:
    """Render ``messages`` in harmony, generate, print deltas as they come; returns the parsed result."""
    prompt = fmt.render(messages, **render)
    parser = fmt.parser()

    def on_token(token):
        for d in parser.feed(token):
            printer(d)

    reason, n, seconds = _run(engine, prompt, params, on_token)
    for d in parser.finish():
        printer(d)
    if reason == "stop" and parser.output.tool_calls:
        reason = "tool_calls"
    result = Result(parser.output, reason, len(prompt), n, seconds)
    printer.end(result)
    return result


def stream_raw(engine, fmt: ChatFormat, text: str, params, printer: Printer) -> Result:
    """Plain completion of ``text`` (special-token text such as <|start|> is encoded as those tokens)."""
    prompt = fmt.tokenizer.encode(text, allowed_special="all")
    stream, output = TextStream(fmt.tokenizer), Output()

    def on_token(token):
        if token in params.stop_token_ids:
            return
        piece = stream.push(token)
        output.content += piece
        printer(Delta("content", piece))

    reason, n, seconds = _run(engine, prompt, params, on_token)
    printer(Delta("content", stream.flush()))
    result = Result(output, reason, len(prompt), n, seconds)
    printer.end(result)
    return result
