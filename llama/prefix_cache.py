"""Prefix reuse: which KV slot a new sequence takes, and how much of its prompt's keys and values it finds there.

A slot keeps the keys and values of the sequence that last ran in it until another sequence needs the slot. This
module only does the bookkeeping, in plain Python over token ids: which tokens each free slot holds, which slot a
prompt should take, and from where a shared prefix should be copied into it (the engine does the copy with
`Transformer.copy_prefix`). Under torchrun every rank runs the same admissions in the same order, so the decisions
depend on token ids and admission order only, never on timing.
"""

from dataclasses import dataclass
from typing import Optional

# A copy moves n positions x layers of keys and values; computing them again is a forward pass over n tokens.
# Beyond a handful of tokens the copy is far cheaper; below this, the copy's fixed cost (two small copies per
# layer) is not worth it and the new sequence computes those tokens itself.
MIN_COPY = 16


@dataclass
class Placement:
    """Where a new sequence goes: its `slot`, and the `reused` prompt tokens whose keys and values it starts with,
    in place already (`source` None) or to be copied there from slot `source` (positions [0, reused))."""

    slot: int
    reused: int
    source: Optional[int] = None


def shared_prefix(a: list[int], b: list[int]) -> int:
    """The number of leading tokens `a` and `b` have in common (list slices compare in C: a binary search over
    them is much faster than a Python loop for the thousands of tokens of a long chat)."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # a[:low] == b[:low]; the answer lies in [low, high]
        middle = (low + high + 1) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


class PrefixCache:
    """The token ids whose keys and values each free slot holds, and the choice of a slot for each new sequence.

    A slot in use is described by its sequence (the engine passes `(prompt_tokens + tokens)[:filled]` of each
    running sequence to `place`), so that nothing here has to follow the decode steps. A free slot keeps at most
    `max_seq_len - 1` tokens: a reused prefix is at most a prompt's length - 1 <= max_seq_len - 1 tokens, so the
    last position of a free slot never holds anything reusable, and padding rows may write there.
    """

    def __init__(self, slots: int, max_seq_len: int, enabled: bool = True) -> None:
        self.enabled, self.max_seq_len = enabled, max_seq_len
        self.cached: list[list[int]] = [[] for _ in range(slots)]  # free slots' tokens; [] while in use
        self._used = [-1] * slots  # when each slot last took, served or gave back a sequence (a count of those)
        self._clock = 0

    def place(self, prompt: list[int], free: list[int], running: dict[int, list[int]], reuse: bool) -> Placement:
        """Choose a slot among `free` (not empty, ascending) for `prompt`, given the tokens of the slots in use
        (`running`: slot -> tokens); `reuse` False (or the cache disabled) reuses nothing. The slot counts as
        taken from now on."""
        limit = len(prompt) - 1 if reuse and self.enabled else 0  # the last prompt token must give logits
        held = {**{slot: self.cached[slot] for slot in free}, **running}
        matches = {slot: min(shared_prefix(tokens, prompt), limit) for slot, tokens in held.items()}
        in_place = max(free, key=lambda slot: (matches[slot], -slot))
        best = max(matches, key=lambda slot: (matches[slot], -slot))
        if not self.enabled:
            placement = Placement(free[0], 0)  # the lowest free slot, as without any cache
        elif matches[in_place] >= MIN_COPY and matches[in_place] + MIN_COPY > matches[best]:
            placement = Placement(in_place, matches[in_place])
            # The slot holding the prefix may lie above every slot in use, widening each decode step: an unused
            # lower slot takes a copy instead, and the prefix stays where it was for later prompts.
            lower = [slot for slot in free if slot < in_place and not self.cached[slot]]
            if lower and in_place > max(running, default=-1):
                placement = Placement(lower[0], matches[in_place], in_place)
        elif matches[best] >= MIN_COPY:  # in a slot in use, or far longer than what any free slot holds
            placement = Placement(self._victim(free, running, avoid=best), matches[best], best)
        else:  # nothing worth a copy: evict, and keep whatever few tokens the slot happens to share
            victim = self._victim(free, running)
            placement = Placement(victim, matches[victim])
        self._clock += 1
        for slot in (placement.slot, placement.source):
            if slot is not None:
                self._used[slot] = self._clock
        self.cached[placement.slot] = []
        return placement

    def _victim(self, free: list[int], running: dict[int, list[int]], avoid: Optional[int] = None) -> int:
        """The free slot to overwrite: among those below the highest slot in use (taking one widens no decode
        step), the one used longest ago; else the lowest, since every further row costs each decode step of
        every sequence while a cache is only a bet on a later prompt. `avoid` (a copy's source) only if alone."""
        candidates = [slot for slot in free if slot != avoid] or free
        within = [slot for slot in candidates if slot < max(running, default=-1)]
        return min(within, key=lambda slot: (self._used[slot], slot)) if within else candidates[0]

    def release(self, slot: int, tokens: list[int]) -> int:
        """Slot `slot` is free again and holds the keys and values of `tokens` (those of positions [0, len)); the
        number of them it keeps."""
        self.cached[slot] = list(tokens[: self.max_seq_len - 1])
        self._clock += 1
        self._used[slot] = self._clock
        return len(self.cached[slot])

    def forget(self, slot: int) -> None:
        """Free slot `slot` holds nothing reusable any more (its keys and values were overwritten)."""
        self.cached[slot] = []

    def scratch_position(self, slot: int, width: int = 1) -> int:
        """Where a row of `width` tokens without a sequence may write in free slot `slot` (decode steps span
        every slot from 0): just past its cached tokens, which are cut short if the context has no room there."""
        start = min(len(self.cached[slot]), self.max_seq_len - width)
        del self.cached[slot][start:]
        return start
