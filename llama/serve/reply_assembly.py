"""A request's sequences, as they progress, assembled into OpenAI replies: each choice's text (decoded as its
tokens arrive, cut before a stop string), its logprobs, and the reply whole or streamed as server-sent events.

Chat replies have n choices, each its text or, where the request has tools, its tool calls. A choice is read for
tool calls once it has ended with a stop token (a reply cut by max_tokens is text). Streamed, a choice whose text
could be a call (it starts with <|python_tag|>, `{`, `[`, `<function=` or a built-in's `name.call(`) is held back
until it ends: then it goes out as `delta.tool_calls` (each call's id, type and name, then its arguments), or as
content if it is no call after all. Any other text streams as it is generated.
"""

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from llama.serve.protocol import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatDelta,
                                  ChatLogprobs, ChatTokenLogprob, Completion, CompletionChoice, CompletionChunk,
                                  CompletionLogprobs, ReplyHeader, TopLogprob, ToolCallOut, Usage, chat_chunk,
                                  completion_chunk, error_body, usage)
from llama.text_stream import TokenDecoder
from llama.tokenizer import Tokenizer
from llama.tool_calls import parse_tool_calls


class ChoiceText:
    """One choice's text, decoded as tokens arrive and cut before the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one, so a streamed
    stop string never shows, even in part. `starts[i]` is where token i's text starts: logprobs are kept only for
    the tokens that begin before the cut.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], chat: bool = False):
        self.stop = stop
        self._decoder = TokenDecoder(tokenizer, chat)  # a chat reply leaves a tool call's python_tag out
        self.text = ""  # everything decoded so far (up to the stop string once one is found)
        self.sent = 0  # how much of `text` has been handed out
        self.starts: list[int] = []
        self.stopped = False  # a stop string was found

    def feed(self, tokens: list[int]) -> str:
        """Add newly generated tokens; return the text that may now be sent."""
        for token in tokens:
            self.starts.append(len(self.text))
            if self.stopped:
                continue
            self.text += self._decoder.decode(token)
            self._cut()
        held = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        return self._take(len(self.text) - held)

    def finish(self) -> str:
        """The sequence ended: the rest of the text."""
        if not self.stopped:
            self.text += self._decoder.finish()
            self._cut()
        return self._take(len(self.text))

    @property
    def python_tag(self) -> bool:
        """Whether a chat reply began with <|python_tag|> (a tool call), which its text leaves out."""
        return self._decoder.python_tag

    def n_kept(self) -> int:
        """How many tokens begin before the stop string (all of them without one)."""
        return sum(1 for start in self.starts if start < len(self.text)) if self.stopped else len(self.starts)

    def _cut(self) -> None:
        # A stop string may span tokens but lies wholly after the text already sent (held back above).
        found = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if found:
            self.text, self.stopped = self.text[: min(found)], True

    def _take(self, end: int) -> str:
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent += len(piece)
        return piece


def chat_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]], n_top: int) -> ChatLogprobs:
    """Chat's `logprobs` of `tokens`, each with up to `n_top` of its most likely alternatives."""

    def entry(token: int, logprob: float) -> TopLogprob:
        data = tokenizer.model.decode_single_token_bytes(token)
        return TopLogprob(token=data.decode("utf-8", errors="replace"), logprob=logprob, bytes=list(data))

    content: list[ChatTokenLogprob] = []
    for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
        alternatives = top[i][:n_top] if i < len(top) else []
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives]})
    return ChatLogprobs(content=content)


def completion_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float | None],
                        top: list[list[tuple[int, float]] | None], offset: int = 0) -> CompletionLogprobs:
    """Completions' `logprobs` of `tokens`, whose text starts after `offset` characters of the choice's text."""
    pieces = [tokenizer.decode([t]) for t in tokens]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    tops = [None if t is None else {tokenizer.decode([i]): lp for i, lp in t} for t in top]
    return CompletionLogprobs(tokens=pieces, token_logprobs=logprobs, top_logprobs=tops, text_offset=offsets)


def sse(data: Any) -> str:
    """One server-sent event: a JSON object, or the final "[DONE]"."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"

class Progress(Protocol):
    """What replies need of a request's sequences (llama.serve.runner.Batch)."""

    sequences: list[Any]  # llama.engine.Request, one per prompt

    def updates(self) -> AsyncIterator[tuple[int, int, str | None]]: ...

    def cancel(self, index: int | None = None) -> None: ...


@dataclass
class Piece:
    """New output of choice `index`: text that may be sent, tokens [first, end) now part of the reply, and the
    finish_reason once it ended."""

    index: int
    text: str
    first: int
    end: int
    finish_reason: str | None


async def pieces(batch: Progress, choices: list[ChoiceText]) -> AsyncIterator[Piece]:
    """Each choice's text as its tokens arrive; a choice that meets a stop string is cancelled and ends there."""
    kept = [0] * len(choices)
    async for index, n_tokens, reason in batch.updates():
        choice, sequence = choices[index], batch.sequences[index]
        if choice.stopped:  # tokens generated before the cancellation took effect
            continue
        text = choice.feed(sequence.tokens[len(choice.starts) : n_tokens])
        if choice.stopped:
            batch.cancel(index)
            reason = "stop"
        if reason is not None:
            text += choice.finish()
            reason = "length" if reason == "length" else "stop"
        first, kept[index] = kept[index], choice.n_kept()
        if text or reason is not None or kept[index] > first:
            yield Piece(index, text, first, kept[index], reason)


def recorded(values: list, first: int, end: int) -> list:
    """values[first:end], None where the engine recorded nothing (no alternatives were asked for)."""
    return [values[i] if i < len(values) else None for i in range(first, end)]


@dataclass
class CompletionReply:
    """What a completions reply needs: per prompt its tokens and (with echo) its text."""

    tokenizer: Tokenizer
    header: ReplyHeader
    stop: list[str]
    logprobs: int | None
    echo: bool
    prompts: list[list[int]]
    prompt_texts: list[str]
    include_usage: bool = False
    n: int = 1  # choices per prompt: `prompts` holds each prompt n times in a row

    def _logprobs(self, index: int, sequence: Any, first: int, end: int, offset: int,
                  with_prompt: bool = False) -> CompletionLogprobs | None:
        """Logprobs of generated tokens [first, end), after the prompt's own when `with_prompt`."""
        if self.logprobs is None:
            return None
        tokens, values = sequence.tokens[first:end], sequence.logprobs[first:end]
        top = recorded(sequence.top_logprobs, first, end)
        if with_prompt:
            n_prompt = len(self.prompts[index])
            tokens, values = self.prompts[index] + tokens, recorded(sequence.prompt_logprobs, 0, n_prompt) + values
            top = recorded(sequence.prompt_top_logprobs, 0, n_prompt) + top
        top = [t if self.logprobs else None for t in top]
        return completion_logprobs(self.tokenizer, tokens, values, top, offset)

    def _choices(self) -> list[ChoiceText]:
        return [ChoiceText(self.tokenizer, self.stop) for _ in self.prompts]

    def _usage(self, choices: list[ChoiceText]) -> Usage:
        return usage(sum(map(len, self.prompts[:: self.n])), sum(c.n_kept() for c in choices))

    async def whole(self, batch: Progress) -> Completion:
        choices = self._choices()
        texts = [[self.prompt_texts[i] if self.echo else ""] for i in range(len(choices))]
        reasons: list[str | None] = [None] * len(choices)
        async for piece in pieces(batch, choices):
            texts[piece.index].append(piece.text)
            reasons[piece.index] = piece.finish_reason or reasons[piece.index]
        results: list[CompletionChoice] = []
        for i, choice in enumerate(choices):
            logprobs = self._logprobs(i, batch.sequences[i], 0, choice.n_kept(), 0, self.echo)
            results.append(CompletionChoice(index=i, text="".join(texts[i]), logprobs=logprobs,
                                            finish_reason=reasons[i]))
        return {**self.header, "choices": results, "usage": self._usage(choices)}

    def stream(self, batch: Progress) -> AsyncIterator[str]:
        return guarded(self._events(batch), batch)

    async def _events(self, batch: Progress) -> AsyncIterator[str]:
        extra = {"usage": None} if self.include_usage else {}
        choices, offsets = self._choices(), [0] * len(self.prompts)
        echoed = [not self.echo] * len(self.prompts)
        async for piece in pieces(batch, choices):
            i = piece.index
            if not echoed[i]:  # the prompt first, with its logprobs, known once it is prefilled (its first report)
                echoed[i], offsets[i] = True, len(self.prompt_texts[i])
                logprobs = self._logprobs(i, batch.sequences[i], 0, 0, 0, with_prompt=True)
                yield sse({**completion_chunk(self.header, i, self.prompt_texts[i], logprobs=logprobs), **extra})
            logprobs = self._logprobs(i, batch.sequences[i], piece.first, piece.end, offsets[i])
            offsets[i] += len(piece.text)
            if piece.text or piece.end > piece.first:
                yield sse({**completion_chunk(self.header, i, piece.text, logprobs=logprobs), **extra})
            if piece.finish_reason is not None:
                yield sse({**completion_chunk(self.header, i, "", piece.finish_reason), **extra})
        if self.include_usage:
            last: CompletionChunk = {**self.header, "choices": [], "usage": self._usage(choices)}
            yield sse(last)
        yield sse("[DONE]")


def _error_event(error: Exception) -> str:
    return sse(error_body(500, str(error)))


async def guarded(events: AsyncIterator[str], batch: Progress,
                  failure: Callable[[Exception], str] = _error_event) -> AsyncIterator[str]:
    """A streamed reply's events; a failure after the status line was sent is said as a last event (`failure`
    writes it); when the client goes away (or it fails), the request's sequences are cancelled, freeing their
    slots."""
    try:
        async for event in events:
            yield event
    except Exception as error:  # noqa: BLE001 - the status line is sent: say it as an event
        yield failure(error)
    finally:
        batch.cancel()  # nothing to do once finished


# How a reply that is a tool call begins, after any whitespace (a leading <|python_tag|> says so too).
CALL_STARTS = ("{", "[", "<function=", "brave_search.call(", "wolfram_alpha.call(")


def tool_calls_out(text: str, python_tag: bool, parallel: bool) -> list[ToolCallOut]:
    """The calls a finished reply makes, in OpenAI's shape (arguments as JSON text); only the first unless
    `parallel`."""
    calls = parse_tool_calls(text, python_tag)
    return [ToolCallOut(id=call["id"], type="function",
                        function={"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)})
            for call in calls[: None if parallel else 1]]


def could_be_a_call(text: str, python_tag: bool) -> bool | None:
    """True when a reply beginning with `text` is written as a call, False when it cannot be one, None while
    too little of it has come to tell."""
    if python_tag:
        return True
    start = text.lstrip()
    if any(start.startswith(marker) for marker in CALL_STARTS):
        return True
    return None if any(marker.startswith(start) for marker in CALL_STARTS) else False


@dataclass
class _Held:
    """A streamed choice's text held back while it may be a tool call."""

    text: str = ""
    first: int | None = None  # the first held token
    streaming: bool = False  # decided: it is text, and goes out as it comes


@dataclass
class ChatReply:
    """What a chat reply needs besides its sequences (one per choice): the shared header, the stop strings and the
    options; with `parse_calls`, a choice that calls tools is returned as its `tool_calls`."""

    tokenizer: Tokenizer
    header: ReplyHeader
    stop: list[str]
    logprobs: bool
    top_logprobs: int
    prompt_len: int
    include_usage: bool = False
    n: int = 1
    parse_calls: bool = False
    parallel_tool_calls: bool = True
    _choices: list[ChoiceText] = field(default_factory=list, init=False)

    def _logprobs(self, sequence: Any, first: int, end: int) -> ChatLogprobs | None:
        if not self.logprobs:
            return None
        return chat_logprobs(self.tokenizer, sequence.tokens[first:end], sequence.logprobs[first:end],
                             [t or [] for t in recorded(sequence.top_logprobs, first, end)], self.top_logprobs)

    def _new_choices(self) -> list[ChoiceText]:
        self._choices = [ChoiceText(self.tokenizer, self.stop, chat=True) for _ in range(self.n)]
        return self._choices

    def _calls(self, index: int, text: str, reason: str | None) -> list[ToolCallOut]:
        if not self.parse_calls or reason != "stop":
            return []
        return tool_calls_out(text, self._choices[index].python_tag, self.parallel_tool_calls)

    def _usage(self) -> Any:
        return usage(self.prompt_len, sum(choice.n_kept() for choice in self._choices))

    async def whole(self, batch: Progress) -> ChatCompletion:
        choices = self._new_choices()
        texts: list[list[str]] = [[] for _ in choices]
        reasons: list[str | None] = [None] * len(choices)
        async for piece in pieces(batch, choices):
            texts[piece.index].append(piece.text)
            reasons[piece.index] = piece.finish_reason or reasons[piece.index]
        results = []
        for i, choice in enumerate(choices):
            text, reason = "".join(texts[i]), reasons[i]
            message = AssistantMessage(role="assistant", content=text)
            calls = self._calls(i, text, reason)
            if calls:
                message, reason = AssistantMessage(role="assistant", content=None, tool_calls=calls), "tool_calls"
            logprobs = self._logprobs(batch.sequences[i], 0, choice.n_kept())
            results.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason))
        return {**self.header, "choices": results, "usage": self._usage()}

    def stream(self, batch: Progress) -> AsyncIterator[str]:
        return guarded(self._events(batch), batch)

    async def _events(self, batch: Progress) -> AsyncIterator[str]:
        async for chunk in self.chunks(batch):
            yield sse(chunk)
        yield sse("[DONE]")

    async def chunks(self, batch: Progress) -> AsyncIterator[ChatCompletionChunk]:
        """The streamed reply's chunks, as they come (the Responses API translates them into its events)."""
        extra = {"usage": None} if self.include_usage else {}
        choices, held = self._new_choices(), [_Held(streaming=not self.parse_calls) for _ in range(self.n)]
        for i in range(self.n):
            yield {**chat_chunk(self.header, {"role": "assistant", "content": ""}, index=i), **extra}
        async for piece in pieces(batch, choices):
            for chunk in self._piece_chunks(piece, held[piece.index], batch.sequences[piece.index]):
                yield {**chunk, **extra}
        if self.include_usage:
            yield {**self.header, "object": "chat.completion.chunk", "choices": [], "usage": self._usage()}

    def _piece_chunks(self, piece: Piece, held: _Held, sequence: Any) -> list[ChatCompletionChunk]:
        """The chunks one piece of a choice gives: its text, or nothing while it is held back."""
        i, reason, chunks = piece.index, piece.finish_reason, []
        if not held.streaming:
            if held.first is None:
                held.first = piece.first
            held.text += piece.text
            held.streaming = could_be_a_call(held.text, self._choices[i].python_tag) is False
            if reason is None and not held.streaming:
                return []
            calls = self._calls(i, held.text, reason)
            if calls:
                return [*self._call_chunks(i, calls), chat_chunk(self.header, {}, "tool_calls", index=i)]
            piece = Piece(i, held.text, held.first, piece.end, reason)
        logprobs = self._logprobs(sequence, piece.first, piece.end)
        if piece.text or (logprobs and logprobs["content"]):
            chunks.append(chat_chunk(self.header, ChatDelta(content=piece.text), logprobs=logprobs, index=i))
        if reason is not None:
            chunks.append(chat_chunk(self.header, {}, reason, index=i))
        return chunks

    def _call_chunks(self, index: int, calls: list[ToolCallOut]) -> list[ChatCompletionChunk]:
        chunks = []
        for number, call in enumerate(calls):
            head = {"index": number, "id": call["id"], "type": "function",
                    "function": {"name": call["function"]["name"], "arguments": ""}}
            arguments = {"index": number, "function": {"arguments": call["function"]["arguments"]}}
            chunks += [chat_chunk(self.header, ChatDelta(tool_calls=[head]), index=index),
                       chat_chunk(self.header, ChatDelta(tool_calls=[arguments]), index=index)]
        return chunks
