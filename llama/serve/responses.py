"""OpenAI-shaped replies: the text of a choice as its tokens arrive (cut before a stop string), logprobs in the
chat and the completions shapes, error bodies, and server-sent events."""

import codecs
import json
import time
import uuid
from typing import Any

from llama.tokenizer import Tokenizer


class ChoiceText:
    """One choice's text, decoded as tokens arrive and cut before the first stop string.

    Text that could be the start of a stop string is held back until it is known not to be one, so a streamed
    stop string never shows, even in part. `starts[i]` is where token i's text starts: logprobs are kept only for
    the tokens that begin before the cut.
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str], skip_python_tag: bool = False):
        self.tokenizer, self.stop = tokenizer, stop
        # A chat reply's leading python_tag marks a tool call: Llama.chat_completion leaves it out of the content.
        self.skip = tokenizer.python_tag_id if skip_python_tag else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""  # everything decoded so far (up to the stop string once one is found)
        self.sent = 0  # how much of `text` has been handed out
        self.starts: list[int] = []
        self.stopped = False  # a stop string was found

    def feed(self, tokens: list[int]) -> str:
        """Add newly generated tokens; return the text that may now be sent."""
        for token in tokens:
            self.starts.append(len(self.text))
            if self.stopped or (token == self.skip and len(self.starts) == 1):
                continue
            self.text += self._utf8.decode(self.tokenizer.model.decode_single_token_bytes(token))
            self._cut()
        held = 0 if self.stopped else max((len(s) - 1 for s in self.stop), default=0)
        return self._take(len(self.text) - held)

    def finish(self) -> str:
        """The sequence ended: the rest of the text."""
        if not self.stopped:
            self.text += self._utf8.decode(b"", final=True)
            self._cut()
        return self._take(len(self.text))

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
                  top: list[list[tuple[int, float]]], n_top: int) -> dict:
    """Chat's `logprobs`: {"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}."""

    def entry(token: int, logprob: float) -> dict:
        data = tokenizer.model.decode_single_token_bytes(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    content = []
    for i, (token, logprob) in enumerate(zip(tokens, logprobs)):
        alternatives = top[i][:n_top] if i < len(top) else []
        content.append({**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in alternatives]})
    return {"content": content}


def completion_logprobs(tokenizer: Tokenizer, tokens: list[int], logprobs: list[float | None],
                        top: list[list[tuple[int, float]] | None], offset: int = 0) -> dict:
    """Completions' `logprobs`: parallel lists of tokens, their logprobs, dicts of the most likely tokens at each
    position, and where each token's text starts (from `offset`, the length of text before the first one)."""
    pieces = [tokenizer.decode([t]) for t in tokens]
    offsets = []
    for piece in pieces:
        offsets.append(offset)
        offset += len(piece)
    tops = [None if t is None else {tokenizer.decode([i]): lp for i, lp in t} for t in top]
    return {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def reply_header(kind: str, model: str) -> dict:
    """The fields every reply and chunk of one request shares: `kind` is "chat.completion" or "text_completion"."""
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": model}


def chat_chunk(header: dict, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**header, "object": "chat.completion.chunk", "choices": [choice]}


def completion_chunk(header: dict, index: int, text: str, finish_reason: str | None = None,
                     logprobs: dict | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**header, "choices": [choice]}


def sse(data: Any) -> str:
    """One server-sent event: a JSON object, or the final "[DONE]"."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
