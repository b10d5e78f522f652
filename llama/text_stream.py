"""One sequence's text, piece by piece as its tokens are generated: `TokenDecoder` turns tokens into text one at a
time, and `TextStream` iterates over a generation's pieces."""

import codecs
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from llama.tokenizer import Tokenizer

if TYPE_CHECKING:  # annotations only
    from llama.chat_format import Message
    from llama.tool_calls import ToolCall


class TokenDecoder:
    """Decodes one sequence's tokens to text, one token at a time, handing out whole UTF-8 characters only.

    A character spread over several tokens never shows up as U+FFFD: its text comes with its last byte. Bytes that
    can never become valid become U+FFFD as `Tokenizer.decode` makes them, so the pieces and `finish()` join into
    exactly `Tokenizer.decode` of the same tokens. With `chat`, a leading python_tag token gives no text: it marks
    the reply as a tool call, and `python_tag` says it was there.
    """

    def __init__(self, tokenizer: Tokenizer, chat: bool = False):
        self._token_bytes = tokenizer.model.decode_single_token_bytes
        self._skipped = tokenizer.python_tag_id if chat else None  # skipped as the first token only
        # errors="replace" matches Tokenizer.decode, which replaces only bytes that can never become valid.
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._first = True
        self.python_tag = False

    def decode(self, token: int) -> str:
        """The text of `token`: the characters its bytes complete, possibly none."""
        first, self._first = self._first, False
        if first and token == self._skipped:
            self.python_tag = True
            return ""
        return self._utf8.decode(self._token_bytes(token))

    def finish(self) -> str:
        """The sequence ended: the rest of its text (U+FFFD for a character that was never completed)."""
        return self._utf8.decode(b"", final=True)


class TextStream:
    """The text of one sequence, piece by piece as its tokens are generated; iterate over it for `str` pieces.

    A piece is held back until its bytes form whole UTF-8 characters, so a character spread over several tokens
    never shows up as U+FFFD mid-stream; the pieces join into exactly the non-streamed text. While it runs,
    `tokens` holds the generated ids (stop token excluded), and at the end `stop_token` the id that stopped it
    (None when it ran out of length). `release()` is called once when the stream is closed or no longer held
    (to stop generating what nobody will read). Under torchrun every process must iterate its stream in the same
    way: they compute each token together. A chat stream has `reply(tokens, stop_token)`, which makes its finished
    reply into a Message (`message`, `tool_calls`); its leading python_tag gives no text.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: list[int], tokens: Iterator[int],
                 release: Callable[[], None] = lambda: None,
                 reply: "Callable[[list[int], int | None], Message] | None" = None):
        self.prompt_tokens, self.reply = prompt_tokens, reply
        chat = reply is not None
        self._progress = _Progress()
        # The generator holds the progress, not the stream, so a stream nobody holds is freed at once.
        self._pieces = _decode(tokenizer, tokens, chat, self._progress)
        self._release = weakref.finalize(self, release)

    @property
    def tokens(self) -> list[int]:
        """The ids generated so far, stop token excluded."""
        return self._progress.tokens

    @property
    def stop_token(self) -> int | None:
        """The id that ended the sequence; None while it runs, or when it ran out of length."""
        return self._progress.stop_token

    @property
    def finished(self) -> bool:
        """Whether the stream was read to the end or closed."""
        return self._progress.finished

    @property
    def message(self) -> "Message | None":
        """The assistant's reply as chat_completion gives it, once the stream has ended; None before, and for a
        text completion."""
        if not self._progress.finished or self.reply is None:
            return None
        if self._progress.message is None:
            self._progress.message = self.reply(list(self.tokens), self.stop_token)
        return self._progress.message

    @property
    def tool_calls(self) -> "list[ToolCall] | None":
        """The tool calls of a chat reply once the stream has ended ([] for none, or without tools); None before."""
        message = self.message
        return None if message is None else message.get("tool_calls", [])

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating: the text so far stays in `tokens`, and the sequence's KV slot is given back."""
        self._pieces.close()
        self._progress.finished = True
        self._release()


@dataclass
class _Progress:
    tokens: list[int] = field(default_factory=list)
    stop_token: int | None = None
    finished: bool = False
    message: "Message | None" = None  # the reply, made once


def _decode(tokenizer: Tokenizer, tokens: Iterator[int], chat: bool, progress: _Progress) -> Iterator[str]:
    decoder = TokenDecoder(tokenizer, chat)
    for token in tokens:
        if token in tokenizer.stop_tokens:
            progress.stop_token = token
            break
        progress.tokens.append(token)
        piece = decoder.decode(token)
        if piece:
            yield piece
    progress.finished = True
    tail = decoder.finish()
    if tail:
        yield tail
