"""Each sequence's own changes to its logits row before a token is picked (rank 0 only, where tokens are picked):
its `logit_bias`, its presence and frequency penalties, and its grammar's token mask, in that order.

Grammar masks are computed while the forward pass runs wherever it leaves processors idle (beside an accelerator,
or a CPU forward pass on fewer threads than there are cores): `start()` hands the constrained sequences' matchers
to a background thread before the engine calls the model, and `apply()` waits for the masks only once the logits
exist; llguidance releases the GIL while it computes. A CPU forward pass on every core would only be slowed down by
a thread competing for them (measured at batch 8 on the 2-core test machine: 89.9 % of free decode speed
overlapped, 93.7 % computed first), so there `start()` computes the masks at once, on as many threads as torch
uses. A JSON mask takes from tens of microseconds to under a millisecond (inside a string, where most tokens are
allowed).
"""

import functools
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional

import torch

from llama.grammar import GrammarVocabulary, grammar_vocabulary

if TYPE_CHECKING:
    from llama.request import Request, SamplingParams
    from llama.tokenizer import Tokenizer


def apply_logit_bias(row: torch.Tensor, bias: dict[int, float]) -> None:
    """Add OpenAI's `logit_bias` (token id -> bias) to a logits row (vocab,), in place."""
    ids = torch.tensor(list(bias), device=row.device)
    row.index_add_(0, ids, torch.tensor(list(bias.values()), dtype=row.dtype, device=row.device))


def apply_penalties(row: torch.Tensor, generated: list[int], presence: float, frequency: float) -> None:
    """OpenAI's penalties, in place on a logits row (vocab,): every token generated so far loses `presence` once
    and `frequency` times the number of times it was generated."""
    if not generated:
        return
    ids, counts = torch.tensor(generated, device=row.device).unique(return_counts=True)
    row[ids] -= presence + frequency * counts.to(row.dtype)


@functools.lru_cache(maxsize=8)
def _byte_masks(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(256, 8): for each byte value, its 8 bits as additive logit masks, 0 where set and -inf where clear."""
    bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
    return torch.zeros(256, 8, dtype=dtype).masked_fill_(bits == 0, float("-inf")).to(device)


def apply_masks(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """`logits` (rows, vocab) with the tokens that `masks` do not allow at -inf. Masks are (rows, words) int32, one
    bit per token (bit j of word w: token 32 * w + j); tokens beyond their bits (a model vocabulary larger than its
    tokenizer's) are not allowed. Each byte of a mask (a little-endian int32's byte k holds its bits 8k..8k+7)
    looks up its 8 additive masks, and one addition applies them: about four times faster on the CPU than
    unpacking the bits into booleans for torch.where."""
    table = _byte_masks(logits.dtype, logits.device)
    additive = table[masks.contiguous().view(torch.uint8).long()].flatten(1)  # (rows, 32 * words)
    vocab_size = logits.shape[1]
    if additive.shape[1] < vocab_size:
        additive = torch.nn.functional.pad(additive, (0, vocab_size - additive.shape[1]), value=float("-inf"))
    return logits + additive[:, :vocab_size]


def adjusts_logits(params: "SamplingParams") -> bool:
    return bool(params.logit_bias or params.presence_penalty or params.frequency_penalty)


class PendingMasks:
    """The masks of some of a step's sequences (rows `rows` of its logits), being computed."""

    def __init__(self, rows: list[int], future: "Future[torch.Tensor]"):
        self.rows, self.future = rows, future


class LogitsProcessing:
    """The engine's per-sequence logits processing, and its grammar machinery: the vocabulary is indexed for
    llguidance at the first grammar (on every rank that checks one); `overlap` says whether masks are computed in a
    background thread during the forward pass."""

    def __init__(self, tokenizer: "Tokenizer", vocab_size: int, device: torch.device):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.overlap = device.type != "cpu" or torch.get_num_threads() < cores  # see the module docstring
        self._thread: Optional[ThreadPoolExecutor] = None

    def vocabulary(self) -> GrammarVocabulary:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-masks")
        return grammar_vocabulary(self.tokenizer)

    def check(self, params: "SamplingParams") -> Optional[Any]:
        """What SamplingParams.check() cannot know without the model: logit_bias ids within the vocabulary, and a
        grammar this vocabulary can use (ValueError otherwise). The grammar's new matcher, if any."""
        bad = [i for i in params.logit_bias or {} if i >= self.vocab_size]
        if bad:
            raise ValueError(f"logit_bias has token ids outside [0, {self.vocab_size}): {bad[:5]}")
        return self.vocabulary().matcher(params.grammar) if params.grammar is not None else None

    def start(self, sequences: list["Request"]) -> Optional[PendingMasks]:
        """Start computing the masks of those `sequences` that have a grammar (None if none has): in the background
        where the forward pass leaves processors idle, at once otherwise."""
        rows = [i for i, sequence in enumerate(sequences) if sequence.matcher is not None]
        if not rows:
            return None
        vocabulary, matchers = self.vocabulary(), [sequences[i].matcher for i in rows]
        if self.overlap:
            return PendingMasks(rows, self._thread.submit(vocabulary.masks, matchers))
        done: Future[torch.Tensor] = Future()
        done.set_result(vocabulary.masks(matchers, threads=torch.get_num_threads()))
        return PendingMasks(rows, done)

    def apply(self, logits: torch.Tensor, sequences: list["Request"], pending: Optional[PendingMasks]
              ) -> torch.Tensor:
        """`logits` (n, vocab) of `sequences` with each one's bias, penalties and mask applied: a new tensor where
        any applies (the engine keeps the model's logits for logprobs)."""
        adjusted = [i for i, sequence in enumerate(sequences) if adjusts_logits(sequence.params)]
        if adjusted:
            logits = logits.clone()
        for i in adjusted:
            params = sequences[i].params
            if params.logit_bias:
                apply_logit_bias(logits[i], params.logit_bias)
            if params.presence_penalty or params.frequency_penalty:
                apply_penalties(logits[i], sequences[i].tokens, params.presence_penalty, params.frequency_penalty)
        if pending is None:
            return logits
        masks = pending.future.result().to(logits.device, non_blocking=True)
        if len(pending.rows) == len(sequences):
            return apply_masks(logits, masks)
        logits = logits if adjusted else logits.clone()
        logits[pending.rows] = apply_masks(logits[pending.rows], masks)
        return logits

    @staticmethod
    def advance(sequence: "Request", token: int) -> None:
        """Move `sequence`'s grammar past its new `token` (a stop token ends the sequence instead)."""
        if sequence.matcher is not None:
            sequence.matcher.consume_token(token)
