"""`TextStream`: one sequence's text, piece by piece as its tokens are generated."""

import codecs
from collections.abc import Iterator

from llama.tokenizer import Tokenizer


class TextStream:
    """The text of one sequence, piece by piece as its tokens are generated; iterate over it for `str` pieces.

    A piece is held back until its bytes form whole UTF-8 characters, so a character spread over several tokens
    never shows up as U+FFFD mid-stream; the pieces join into exactly the non-streamed text. While it runs,
    `tokens` holds the generated ids (stop token excluded), and at the end `stop_token` the id that stopped it
    (None when it ran out of length). Under torchrun every process must iterate its stream to the end: they
    compute each token together.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_tokens: list[int], tokens: Iterator[int], chat: bool):
        self.prompt_tokens = prompt_tokens
        self.tokens: list[int] = []
        self.stop_token: int | None = None
        self._pieces = self._decode(tokenizer, tokens, chat)

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _decode(self, tokenizer: Tokenizer, tokens: Iterator[int], chat: bool) -> Iterator[str]:
        # errors="replace" matches Tokenizer.decode, which replaces only bytes that can never become valid.
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        for token in tokens:
            if token in tokenizer.stop_tokens:
                self.stop_token = token
                break
            self.tokens.append(token)
            if chat and self.tokens == [tokenizer.python_tag_id]:
                continue  # a chat reply's leading python_tag marks a tool call; chat_completion drops it too
            piece = utf8.decode(tokenizer.model.decode_single_token_bytes(token))
            if piece:
                yield piece
        tail = utf8.decode(b"", final=True)
        if tail:
            yield tail
