"""Byte-level BPE by merge priority, for vocabularies other than Llama 3's (e.g. SmolLM2's, imported from GGUF).

Such a vocabulary is a `tokenizer.model` in tiktoken's line format (`base64(token bytes) id`, the ids being the
model's token ids, with gaps where special tokens sit) plus the sidecar `tokenizer_info.json` beside it: the
pre-tokenizer regex, the special tokens, bos/eos/stop ids, the merges and the chat template text.

tiktoken merges any adjacent pair whose concatenation is a token, by that token's rank; Hugging Face's BPE (and
llama.cpp's) merges only the listed pairs, by their order in the merge list. This module does the latter: per
pre-tokenized piece, it repeatedly merges every occurrence of the listed pair that comes first in the list.
"""

import heapq
import json
from collections.abc import Iterable
from pathlib import Path

import regex

SIDECAR_NAME = "tokenizer_info.json"
SIDECAR_FORMAT = 1
# GPT-2's pre-tokenizer (Hugging Face's ByteLevel with use_regex=True).
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# SmolLM2's: Digits(individual_digits=True) then GPT-2's pattern within the pieces between digits. So every digit
# is a piece of its own, and a whitespace run also ends where a digit begins, as at the end of a piece.
SMOLLM_PATTERN = r"\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"
PRETOKENIZE_PATTERNS = {"gpt2": GPT2_PATTERN, "smollm": SMOLLM_PATTERN}
# Special tokens that end a chat turn, when the chat template uses them.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")
_CACHE_LIMIT = 100_000
_SHORT_PIECE = 32  # longer pieces are merged through a heap


def read_sidecar(path: Path) -> dict:
    """The sidecar `path`, checked for the fields this module reads."""
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable tokenizer sidecar ({error})") from None
    needed = {"format", "pattern", "special_tokens", "bos_id", "eos_id", "stop_ids", "merges", "n_words"}
    if not isinstance(info, dict) or not needed <= info.keys():
        raise ValueError(f"{path} is not a tokenizer sidecar: it needs the fields {sorted(needed)}")
    if info["format"] != SIDECAR_FORMAT:
        raise ValueError(f"{path} has sidecar format {info['format']!r}; this version reads {SIDECAR_FORMAT}")
    return info


class MergeBPE:
    """Encoder with tiktoken's interface subset that Tokenizer and TextStream use: encode_ordinary, decode,
    decode_single_token_bytes and n_vocab."""

    def __init__(self, token_bytes: dict[int, bytes], specials: dict[str, int], merges: Iterable[Iterable[int]],
                 pattern: str, n_vocab: int, name: str = "bpe"):
        self.name, self.n_vocab = name, n_vocab
        self._bytes = dict(token_bytes)
        self._bytes.update({i: s.encode() for s, i in specials.items()})
        self._id_of = {data: i for i, data in token_bytes.items()}
        # A byte without a token of its own is dropped, as Hugging Face's BPE without unk_token and llama.cpp do
        # (SmolLM2 lacks 21 bytes that UTF-8 text never or rarely holds, e.g. 0xC0, 0xF5..0xFF, 0x04).
        self._byte_ids = [self._id_of.get(bytes([b])) for b in range(256)]
        self._merges: dict[tuple[int, int], tuple[int, int]] = {}
        for priority, (left, right) in enumerate(merges):
            merged = self._id_of.get(token_bytes.get(left, b"") + token_bytes.get(right, b""))
            if left not in token_bytes or right not in token_bytes or merged is None:
                raise ValueError(f"{name}: merge {priority} ({left}, {right}) does not make a token")
            self._merges.setdefault((left, right), (priority, merged))
        self._pattern = regex.compile(pattern)
        self._cache: dict[str, list[int]] = {}

    def encode_ordinary(self, text: str) -> list[int]:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates become U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        tokens: list[int] = []
        for piece in self._pattern.findall(text):
            ids = self._cache.get(piece)
            if ids is None:
                ids = self._merge(piece.encode("utf-8"))
                if len(self._cache) < _CACHE_LIMIT:
                    self._cache[piece] = ids
            tokens += ids
        return tokens

    def _merge(self, data: bytes) -> list[int]:
        ids = [self._byte_ids[b] for b in data if self._byte_ids[b] is not None]
        if len(ids) > _SHORT_PIECE:
            return self._merge_long(ids)
        merges = self._merges
        while len(ids) > 1:
            best = min(((merges[pair], pair) for pair in zip(ids, ids[1:]) if pair in merges), default=None)
            if best is None:
                return ids
            (_, merged), pair = best
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
                    out.append(merged)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            ids = out
        return ids

    def _merge_long(self, ids: list[int]) -> list[int]:
        """The same merges in O(n log n): a heap of (priority, position) over a linked list of symbols, popping
        the first-listed pair, leftmost first, and skipping entries that earlier merges made stale."""
        merges, n = self._merges, len(ids)
        prev, after, alive = list(range(-1, n - 1)), list(range(1, n + 1)), [True] * n
        heap = [(merges[pair][0], i) for i, pair in enumerate(zip(ids, ids[1:])) if pair in merges]
        heapq.heapify(heap)
        while heap:
            priority, i = heapq.heappop(heap)
            j = after[i]
            if not alive[i] or j >= n or merges.get((ids[i], ids[j]), (None,))[0] != priority:
                continue
            ids[i], alive[j] = merges[(ids[i], ids[j])][1], False
            after[i] = after[j]
            if after[i] < n:
                prev[after[i]] = i
            for left in (prev[i], i):
                if left >= 0 and after[left] < n and (ids[left], ids[after[left]]) in merges:
                    heapq.heappush(heap, (merges[(ids[left], ids[after[left]])][0], left))
        return [token for token, kept in zip(ids, alive) if kept]

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self._bytes.get(token, b"")

    def decode_bytes(self, tokens: Iterable[int]) -> bytes:
        return b"".join(self._bytes.get(token, b"") for token in tokens)

    def decode(self, tokens: Iterable[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")
