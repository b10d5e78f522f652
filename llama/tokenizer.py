"""The Llama 3 tokenizer: tiktoken BPE with 256 special tokens; other byte-level BPE vocabularies (a
`tokenizer_info.json` sidecar beside `tokenizer.model`, see llama.bpe) through the same interface."""

import base64
import binascii
import operator
import os
import re
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Literal

import tiktoken

from llama.bpe import SIDECAR_NAME, MergeBPE, read_sidecar
from llama.chat_format import ChatFormat, Dialog, Message, Role  # noqa: F401  (where Meta's code imports them)

# How Llama 3 splits text into pieces before BPE merges them into tokens.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# The Llama 3.1 names of the first special tokens; the rest are <|reserved_special_token_N|>.
NAMED_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
# tiktoken's regex engine overflows its stack on whitespace runs of about a million characters, so runs longer
# than this are cut. Text without such runs is never cut, so its ids equal a one-piece encoding.
MAX_RUN_CHARS = 25_000
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (MAX_RUN_CHARS + 1, MAX_RUN_CHARS + 1))


def special_token_names() -> list[str]:
    """The 256 special token strings, in id order."""
    n_reserved = NUM_SPECIAL_TOKENS - len(NAMED_SPECIAL_TOKENS)
    return NAMED_SPECIAL_TOKENS + [f"<|reserved_special_token_{2 + i}|>" for i in range(n_reserved)]


def read_bpe_ranks(path: Path, contiguous: bool = True) -> dict[bytes, int]:
    """Parse a tiktoken ranks file (one `base64-token rank` pair per line), read from disk now. Unless
    `contiguous` is False (token ids of a sidecar vocabulary, with gaps for its special tokens), the ranks must
    be 0..n-1.

    tiktoken's own `load_tiktoken_bpe` caches files keyed by their path string, so a different file later placed
    at the same path would silently give the old ranks; reading the file ourselves avoids that.
    """
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            if len(parts) != 2:
                raise ValueError
            ranks[base64.b64decode(parts[0], validate=True)] = int(parts[1])
        except (ValueError, binascii.Error):
            raise ValueError(
                f"{path} is not a tiktoken BPE ranks file: line {line_no} is not '<base64 token> <rank>'"
            ) from None
    if not ranks:
        raise ValueError(f"{path} is not a tiktoken BPE ranks file: it holds no tokens")
    if contiguous and sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path} is not a tiktoken BPE ranks file: ranks are not unique and 0..{len(ranks) - 1}")
    return ranks


def _split_long_runs(text: str) -> list[str]:
    """Cut `text` only inside runs of over MAX_RUN_CHARS whitespace or non-whitespace characters."""
    pieces, start = [], 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return pieces


class Tokenizer:
    """Llama 3 tokenizer: 128,000 BPE ranks from `tokenizer.model` plus 256 special tokens. With a sidecar
    (llama.bpe.SIDECAR_NAME) beside the file, another byte-level BPE vocabulary, whose Llama-3-only ids
    (eot_id, eom_id, python_tag_id) are None."""

    def __init__(self, model_path: str | os.PathLike):
        path = Path(model_path)
        self.model_path = path
        self.info: dict | None = None
        self.eot_id: int | None = None
        self.eom_id: int | None = None
        self.python_tag_id: int | None = None
        sidecar = path.with_name(SIDECAR_NAME)
        if sidecar.is_file():
            self._init_sidecar(path, sidecar)
        else:
            self._init_llama3(path)
        self.n_words: int = self.model.n_vocab
        longest_first = sorted(self.special_tokens, key=len, reverse=True)  # where one name starts another
        self._special_pattern = re.compile("|".join(re.escape(name) for name in longest_first))

    def _init_llama3(self, path: Path) -> None:
        ranks = read_bpe_ranks(path)
        self.special_tokens = {name: len(ranks) + i for i, name in enumerate(special_token_names())}
        self.model = tiktoken.Encoding(
            name=path.name,
            pat_str=PRETOKENIZE_PATTERN,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.add_bos = True  # Llama 3 prompts start with <|begin_of_text|>
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.stop_tokens = frozenset({self.eos_id, self.eom_id, self.eot_id})
        self._example_special = "<|eot_id|>"

    def _init_sidecar(self, path: Path, sidecar: Path) -> None:
        info = read_sidecar(sidecar)
        ranks = read_bpe_ranks(path, contiguous=False)
        self.info = info
        self.special_tokens = {str(name): int(i) for name, i in info["special_tokens"].items()}
        ids = [*ranks.values(), *self.special_tokens.values()]
        if sorted(ids) != list(range(info["n_words"])):
            raise ValueError(f"{path} and {sidecar}: the token ids are not unique and 0..{info['n_words'] - 1}")
        self.model = MergeBPE({i: data for data, i in ranks.items()}, self.special_tokens, info["merges"],
                              info["pattern"], info["n_words"], name=path.name)
        self.bos_id, self.eos_id = int(info["bos_id"]), int(info["eos_id"])
        self.add_bos = bool(info.get("add_bos", True))  # whether a text prompt starts with bos_id (SmolLM2: no)
        self.stop_tokens = frozenset(int(i) for i in info["stop_ids"]) | {self.eos_id}
        self._example_special = next(iter(self.special_tokens), "")

    def encode(
        self,
        s: str,
        *,
        bos: bool,
        eos: bool,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = (),
    ) -> list[int]:
        """Encode `s` into token ids, optionally wrapped in begin/end-of-text.

        Text that looks like a special token is encoded as ordinary text unless the token is in `allowed_special`
        ("all" or a collection of token strings); a token in `disallowed_special` raises ValueError instead.
        """
        if not isinstance(s, str):
            raise ValueError(f"encode expects a str, got {type(s).__name__}")
        allowed = self._special_set(allowed_special, "allowed_special")
        disallowed = self._special_set(disallowed_special, "disallowed_special") - allowed
        if disallowed:
            for match in self._special_pattern.finditer(s):
                if match.group() in disallowed:
                    raise ValueError(
                        f"text contains the special token {match.group()!r} at character {match.start()}, "
                        "which disallowed_special forbids; allow it with allowed_special or encode it as text "
                        "with disallowed_special=()"
                    )
        tokens = [self.bos_id] if bos else []
        start = 0
        if allowed:
            for match in self._special_pattern.finditer(s):
                if match.group() in allowed:
                    tokens += self._encode_ordinary(s[start : match.start()])
                    tokens.append(self.special_tokens[match.group()])
                    start = match.end()
        tokens += self._encode_ordinary(s[start:])
        if eos:
            tokens.append(self.eos_id)
        return tokens

    def decode(self, tokens: Iterable[int]) -> str:
        """Decode token ids to text; bytes that are not valid UTF-8 on their own become U+FFFD."""
        ids = []
        for token in tokens:
            try:
                if isinstance(token, bool):
                    raise TypeError
                ids.append(operator.index(token))  # numpy integers and 0-d integer tensors too
            except TypeError:
                raise ValueError(f"token ids must be integers, got {token!r}") from None
        bad = [t for t in ids if not 0 <= t < self.n_words]
        if bad:
            raise ValueError(f"token ids must be in [0, {self.n_words}); got {bad[:5]}")
        return self.model.decode(ids)

    def split_special(self, text: str) -> list[str | int]:
        """`text` cut where special tokens' texts occur: the ordinary strings, and those special tokens' ids."""
        pieces: list[str | int] = []
        start = 0
        for match in self._special_pattern.finditer(text):
            pieces += [text[start : match.start()], self.special_tokens[match.group()]]
            start = match.end()
        return [piece for piece in [*pieces, text[start:]] if piece != ""]

    def _encode_ordinary(self, text: str) -> list[int]:
        tokens: list[int] = []
        for piece in _split_long_runs(text):
            tokens += self.model.encode_ordinary(piece)
        return tokens

    def _special_set(self, value: Literal["all"] | Collection[str], argument: str) -> set[str]:
        if value == "all":
            return set(self.special_tokens)
        if isinstance(value, str) or not isinstance(value, Collection):
            raise ValueError(f'{argument} must be "all" or a collection of special token strings, got {value!r}')
        unknown = sorted(set(value) - self.special_tokens.keys())
        if unknown:
            raise ValueError(
                f"{argument} names unknown special tokens {unknown[:3]}; e.g. {self._example_special!r} is valid"
            )
        return set(value)
