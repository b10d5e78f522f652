"""Picking the next token: top-p (nucleus) sampling, and the checks of the values that steer it."""

from typing import Any

import torch

TOP_P_CANDIDATES = 1024  # the nucleus is looked for among this many most likely tokens first


def check_int(name: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """Raise ValueError unless `value` is an int >= `minimum` (or None, when `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}")


def check_bool(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is True or False (not merely truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def check_sampling(temperature: Any, top_p: Any) -> None:
    """Raise ValueError unless temperature >= 0 (0: greedy) and 0 < top_p <= 1."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")


def check_number(name: str, value: Any, low: float, high: float) -> None:
    """Raise ValueError unless `value` is a number (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")


def check_logits_controls(logit_bias: Any, presence_penalty: Any, frequency_penalty: Any, grammar: Any) -> None:
    """Raise ValueError naming the first that is not valid: OpenAI's logit_bias (None, or token ids (ints >= 0) ->
    numbers in [-100, 100]; whether the ids are in the vocabulary is the engine's check), its penalties (numbers
    in [-2, 2]) and a grammar (None or llguidance's grammar text, which the engine compiles)."""
    if logit_bias is not None and not isinstance(logit_bias, dict):
        raise ValueError(f"logit_bias must be a dict of token id -> bias, got {type(logit_bias).__name__}")
    for token, value in (logit_bias or {}).items():
        check_int("a logit_bias token id", token, minimum=0)
        check_number(f"logit_bias[{token}]", value, -100, 100)
    check_number("presence_penalty", presence_penalty, -2, 2)
    check_number("frequency_penalty", frequency_penalty, -2, 2)
    if grammar is not None and not isinstance(grammar, str):
        raise ValueError(f"grammar must be a str (see llama.grammar) or None, got {type(grammar).__name__}")


def sample_top_p(probs: torch.Tensor, top_p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Sample from the smallest set of most likely tokens whose probability mass reaches `top_p`.

    probs: (bsz, vocab) -> (bsz, 1). The draw is an exponential race (argmax of p / Exp(1) noise), which samples
    exactly from the renormalised nucleus and, unlike inverting a CDF over sorted probabilities, does not jump
    to another token when a tiny numerical difference (another model-parallel size, say) reorders near-ties.
    """
    # The nucleus rarely holds more than a few hundred tokens; sort all 128K only when it does not fit.
    candidates = torch.topk(probs, min(TOP_P_CANDIDATES, probs.shape[-1]), dim=-1).values  # sorted, descending
    if candidates.shape[-1] < probs.shape[-1] and bool((candidates.sum(dim=-1) < top_p).any()):
        candidates = torch.sort(probs, dim=-1, descending=True).values
    mass_before = torch.cumsum(candidates, dim=-1) - candidates
    n_kept = (mass_before <= top_p).sum(dim=-1, keepdim=True)  # >= 1: nothing comes before the top token
    threshold = torch.gather(candidates, -1, n_kept - 1)
    nucleus = probs.masked_fill(probs < threshold, 0.0)
    noise = torch.empty_like(nucleus).exponential_(generator=generator)
    return torch.argmax(nucleus / noise, dim=-1, keepdim=True)
