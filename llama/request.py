"""What one generation is: its `SamplingParams`, the checks of a prompt (`check_prompt`), and the `Request` that
carries both through the engine and collects what comes of it."""

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from llama.args import ModelArgs
from llama.sampling import check_bool, check_int, check_logits_controls, check_sampling

MAX_TOP_LOGPROBS = 20

TopLogprobs = list[tuple[int, float]]


@dataclass
class SamplingParams:
    """How one sequence is generated; `check()` says what is valid."""

    max_tokens: int  # new tokens at most; 0 scores the prompt only (with echo_logprobs)
    temperature: float = 0.6  # 0: greedy
    top_p: float = 0.9
    seed: Optional[int] = None  # None: drawn from the engine's generator at submit time
    logprobs: bool = False  # the log-probability of each generated token
    top_logprobs: int = 0  # and the N most likely tokens with theirs, at each generated position
    echo_logprobs: bool = False  # the same for every prompt token (the first one's is None)
    # What changes the logits before a pick, greedy too (logprobs stay the model's): OpenAI's logit_bias (token id
    # -> bias in [-100, 100], added), presence_penalty (subtracted once from each token generated so far) and
    # frequency_penalty (subtracted per occurrence), both in [-2, 2]; and a grammar (llguidance's grammar text,
    # made by llama.grammar) that the generated tokens must match; once complete, only a stop token may follow.
    logit_bias: Optional[dict[int, float]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: Optional[str] = None

    def check(self) -> None:
        """Raise ValueError naming the first field that is not valid."""
        check_int("max_tokens", self.max_tokens, minimum=0)
        check_sampling(self.temperature, self.top_p)
        check_int("seed", self.seed, minimum=0, optional=True)
        check_int("top_logprobs", self.top_logprobs, minimum=0)
        if self.top_logprobs > MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.top_logprobs}")
        check_bool("logprobs", self.logprobs)
        check_bool("echo_logprobs", self.echo_logprobs)
        check_logits_controls(self.logit_bias, self.presence_penalty, self.frequency_penalty, self.grammar)


class PromptTooLong(ValueError):
    """A prompt that leaves no room in the context for what it asks to generate."""


def check_prompt(prompt: Any, max_tokens: int, args: ModelArgs, name: str = "prompt_tokens") -> list[int]:
    """`prompt` as a list of token ids, or ValueError naming `name`: integers (Python, numpy or 0-d tensors; not
    bools) in [0, vocab_size), at least one, and few enough to leave room for the first new token when
    `max_tokens` > 0 (PromptTooLong otherwise). Every way in (library, engine, server) checks prompts here."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if isinstance(prompt, (str, bytes, dict)) or not isinstance(prompt, Iterable):
        raise ValueError(f"{name} must be a list of token ids, got {type(prompt).__name__}")
    ids = []
    for token in prompt:
        try:
            if isinstance(token, bool) or getattr(token, "dtype", None) == torch.bool:
                raise TypeError
            ids.append(operator.index(token))
        except TypeError:
            raise ValueError(f"{name} has a token id that is not an integer: {token!r}") from None
    if not ids:
        raise ValueError(f"{name} is empty; it needs at least one token (e.g. begin_of_text)")
    bad = [t for t in ids if not 0 <= t < args.vocab_size]
    if bad:
        raise ValueError(f"{name} has token ids outside [0, {args.vocab_size}): {bad[:5]}")
    room = args.max_seq_len - (1 if max_tokens else 0)  # one position for the first new token
    if len(ids) > room:
        raise PromptTooLong(f"{name} has {len(ids)} tokens; at most {room} fit in max_seq_len={args.max_seq_len}"
                            f"{' with max_tokens > 0' if max_tokens else ''}")
    return ids


@dataclass(eq=False)
class Request:
    """One prompt's generation: what was asked (prompt, params) and what came of it so far; read it from
    `on_update` or once it finished."""

    prompt_tokens: list[int]
    params: SamplingParams
    on_update: Optional[Callable[["Request"], None]] = field(default=None, repr=False)
    tokens: list[int] = field(default_factory=list)  # generated so far, stop token excluded
    logprobs: list[float] = field(default_factory=list)  # one per generated token (params.logprobs)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)  # per generated token (params.top_logprobs)
    prompt_logprobs: list[Optional[float]] = field(default_factory=list)  # per prompt token; [0] is None
    prompt_top_logprobs: list[Optional[TopLogprobs]] = field(default_factory=list)  # per prompt token; [0] None
    stop_token: Optional[int] = None  # the stop token that ended it, if one did
    finish_reason: Optional[str] = None  # None while running; "stop", "length" or "cancelled"
    # The engine's bookkeeping: the id every rank knows it by, its KV slot and how many positions of it are filled.
    id: int = field(default=-1, repr=False)
    slot: Optional[int] = field(default=None, repr=False)
    filled: int = field(default=0, repr=False)
    generator: Optional[torch.Generator] = field(default=None, repr=False)
    matcher: Any = field(default=None, repr=False)  # rank 0's llguidance matcher of params.grammar

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
