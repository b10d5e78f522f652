"""Prompt lookup: speculative decoding whose drafts come from the sequence's own text, for outputs that repeat
parts of their prompt (edits of code or text, extraction, summaries that quote).

Before a decode step, each sequence that may draft looks for the most recent earlier occurrence of its last n
tokens (n from MAX_NGRAM down to MIN_NGRAM) in its prompt and output, and proposes the tokens that followed it
(`propose`). The engine feeds every row's last token and its draft in one forward call, (rows, 1 + T) tokens, and
keeps what `verify` confirms: at each position, in order, the sequence's own pick is made exactly as without a
draft (greedy: argmax; sampled: one draw of its temperature and top_p distribution p from its own generator); the
draft token there is accepted while the pick equals it, and the first pick that differs, or the one after a
wholly accepted draft, ends the step's tokens. For a sampled sequence that is the standard acceptance rule for a
deterministic draft: the draft token x is accepted with probability p(x), and the pick that rejects it is
distributed as p with x removed, renormalised. Since one draw is made per emitted token, as without drafting, a
greedy or seeded sequence gives the same tokens with prompt lookup as without.

A sequence with a grammar or presence/frequency penalties does not draft: its processing at a position depends
on the picks before it. A step drafts only while its rows x (1 + T) tokens stay within `token_budget` (on a CPU a
step costs about as much as a one-token step while it stays memory bound, and more beyond), and a sequence whose
drafts keep failing at their first token waits longer and longer before its next one.
"""

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

from llama.sampling import sample_top_p

if TYPE_CHECKING:
    from llama.request import Request

MAX_NGRAM = 3  # the longest suffix looked up; longer matches are tried first
MIN_NGRAM = 2  # single tokens match too often by chance in free text ("the", ",")
MAX_WAIT = 16  # steps at most between the drafts of a sequence whose drafts keep failing
# rows x (1 + T) at most in a drafting step: on the 2-core CPU a 1B step of 1 x 9 tokens cost 1.25x a one-token
# step, 2 x 4 about 1.4x, 8 x 2 already 1.4x (README's prompt lookup benchmark): 1 row drafts up to 8 tokens, 2
# rows 3 each, 3 or 4 rows 1 each, more rows none.
TOKEN_BUDGET = 9
DEFAULT_K = 8  # `Llama.build`'s prompt_lookup where it is on by default (eager decoding on the CPU)


def propose(tokens: list[int], k: int, max_ngram: int = MAX_NGRAM, min_ngram: int = MIN_NGRAM) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n tokens of `tokens`, for the
    longest n in [min_ngram, max_ngram] that occurs earlier with at least one token after it; [] if none does."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix, last = tokens[length - n :], tokens[-1]
        # Matches end at `end` < length (the suffix itself ends at length), scanned from the most recent.
        for end in range(length - 1, n - 1, -1):
            if tokens[end - 1] == last and tokens[end - n : end] == suffix:
                return tokens[end : end + k]
    return []


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> int:
    """One draw of a processed logits row (1, vocab) at `temperature` (> 0) and `top_p`: the engine's sampled
    pick, with or without a draft."""
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(sample_top_p(probs, top_p, generator)[0, 0])


def verify(logits: torch.Tensor, draft: list[int], temperature: float, top_p: float,
           generator: Optional[torch.Generator]) -> list[int]:
    """The tokens a sequence keeps from a step that verified `draft`: `logits` (1 + len(draft), vocab) are its
    processed logits at its last token and at each draft token; the accepted draft tokens, then the model's own
    pick at the first mismatch, or after the whole draft (see the module docstring)."""
    if temperature == 0:
        picks = torch.argmax(logits, dim=-1).tolist()
        accepted = next((i for i, token in enumerate(draft) if picks[i] != token), len(draft))
        return picks[: accepted + 1]
    kept = []
    for position in range(len(draft) + 1):
        kept.append(sample(logits[position : position + 1], temperature, top_p, generator))
        if position == len(draft) or kept[-1] != draft[position]:
            break
    return kept


def may_draft(sequence: "Request") -> bool:
    """Whether `sequence`'s logits processing lets it draft: not with a grammar or penalties, whose processing at
    a position depends on the picks before it (logit_bias is the same at every position)."""
    params = sequence.params
    return params.grammar is None and not params.presence_penalty and not params.frequency_penalty


@dataclass
class _History:
    """How a sequence's recent drafts went."""

    failures: int = 0  # drafts in a row whose first token was rejected
    wait: int = 0  # steps to go before its next draft


class PromptLookup:
    """The drafts of the engine's decode steps: up to `k` tokens per sequence and step, rows x (1 + T) at most
    `token_budget` tokens per step. Every rank computes the same drafts (from token ids and the outcomes rank 0
    broadcast)."""

    def __init__(self, k: int, token_budget: int) -> None:
        self.k, self.token_budget = k, token_budget
        self._history: "weakref.WeakKeyDictionary[Request, _History]" = weakref.WeakKeyDictionary()

    def width(self, rows: int, room: int) -> int:
        """1 + T for a step over `rows` rows, each of which has `room` or more positions left in its slot."""
        return max(1, min(1 + self.k, self.token_budget // rows, room))

    def drafts(self, sequences: list["Request"], width: int, max_seq_len: int) -> list[list[int]]:
        """Each sequence's draft for a step of `width` (empty where it does not draft), cut to what it can still
        emit: its max_tokens, and the context, whose last position holds the last token, with no KV."""
        drafts = []
        for sequence in sequences:
            history = self._history.setdefault(sequence, _History())
            limit = min(width - 1, sequence.params.max_tokens - len(sequence.tokens) - 1,
                        max_seq_len - 2 - sequence.filled)
            if history.wait > 0:
                history.wait -= 1
                limit = 0
            if limit <= 0 or not may_draft(sequence):
                drafts.append([])
                continue
            drafts.append(propose(sequence.prompt_tokens + sequence.tokens, limit))
        return drafts

    def record(self, sequence: "Request", draft: list[int], accepted: int) -> None:
        """Note how `sequence`'s `draft` went: after a draft rejected at its first token it waits 1, 2, 4, ...
        steps (at most MAX_WAIT) before the next, and a draft that gains a token ends the wait."""
        history = self._history[sequence]
        if accepted:
            history.failures = 0
        else:
            history.failures += 1
            history.wait = min(2 ** (history.failures - 1), MAX_WAIT)
