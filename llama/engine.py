"""PLACEHOLDER engine: the interface of /work/shared/engine_api.md on top of today's model, one sequence at a time.

It exists only so that `llama.serve` can be written and tested before the continuous-batching engine lands; the
real `llama/engine.py` replaces this file at merge. Sequences run one after another in KV-cache row 0, one token
per `step()`, so a short request waits for the long one before it.
"""

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from llama.model import Transformer
from llama.sampling import sample_top_p
from llama.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 0.6
    top_p: float = 0.9
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    echo_logprobs: bool = False


@dataclass(eq=False)
class Sequence:
    prompt_tokens: list[int]
    params: SamplingParams
    on_update: Callable[["Sequence"], None] | None = None
    id: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    prompt_logprobs: list[float | None] = field(default_factory=list)
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = field(default_factory=list)
    stop_token: int | None = None
    finish_reason: str | None = None
    generator: torch.Generator | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Engine:
    def __init__(self, llama_forward, model: Transformer, tokenizer: Tokenizer, generator: torch.Generator):
        self.forward, self.model, self.tokenizer, self.generator = llama_forward, model, tokenizer, generator
        self.device = model.norm.weight.device
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._submitted: list[Sequence] = []  # since the last step, under _lock
        self._cancelled: list[int] = []
        self._queue: deque[Sequence] = deque()
        self._by_id: dict[int, Sequence] = {}
        self._current: Sequence | None = None
        self._pos = 0
        parallel = dist.is_initialized() and dist.get_world_size() > 1
        # Followers wait for the next step as long as the server is idle: no collective timeout.
        self._group = dist.new_group(backend="gloo", timeout=timedelta(days=365)) if parallel else None

    def submit(self, prompt_tokens: list[int], params: SamplingParams,
               on_update: Callable[[Sequence], None] | None = None) -> Sequence:
        max_seq_len = self.model.args.max_seq_len
        if not prompt_tokens:
            raise ValueError("prompt_tokens is empty")
        if not all(isinstance(t, int) and 0 <= t < self.tokenizer.n_words for t in prompt_tokens):
            raise ValueError(f"prompt_tokens must be ids in [0, {self.tokenizer.n_words})")
        if len(prompt_tokens) + (params.max_tokens > 0) > max_seq_len:
            raise ValueError(f"prompt_tokens: {len(prompt_tokens)} tokens do not fit max_seq_len={max_seq_len}")
        if params.max_tokens < 0 or not 0 <= params.top_logprobs <= 20:
            raise ValueError("max_tokens must be >= 0 and top_logprobs in [0, 20]")
        if not (params.temperature >= 0 and 0 < params.top_p <= 1):
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        if params.seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.generator, device=self.generator.device))
            params = replace(params, seed=seed)
        sequence = Sequence(list(prompt_tokens), params, on_update)
        with self._lock:
            sequence.id = next(self._ids)
            self._submitted.append(sequence)
        return sequence

    def cancel(self, sequence: Sequence) -> None:
        with self._lock:
            self._cancelled.append(sequence.id)

    def step(self) -> bool:
        with self._lock:
            plan = ([(s.id, s.prompt_tokens, s.params) for s in self._submitted], self._cancelled, False)
            submitted, self._submitted, self._cancelled = self._submitted, [], []
        if self._group is not None:
            dist.broadcast_object_list([plan], src=0, group=self._group)
        self._apply(plan, submitted)
        return self._step()

    def follow(self) -> None:
        while True:
            box = [None]
            dist.broadcast_object_list(box, src=0, group=self._group)
            if box[0][2]:
                return
            self._apply(box[0], [Sequence(p, params, id=i) for i, p, params in box[0][0]])
            self._step()

    def shutdown(self) -> None:
        if self._group is not None:
            dist.broadcast_object_list([([], [], True)], src=0, group=self._group)

    def _apply(self, plan, submitted: list[Sequence]) -> None:
        for sequence in submitted:
            self._queue.append(sequence)
            self._by_id[sequence.id] = sequence
        for i in plan[1]:
            sequence = self._by_id.get(i)
            if sequence is not None and not sequence.finished:
                self._finish(sequence, "cancelled")

    def _finish(self, sequence: Sequence, reason: str) -> None:
        sequence.finish_reason = reason
        self._by_id.pop(sequence.id, None)
        if sequence.on_update is not None:
            sequence.on_update(sequence)

    @torch.inference_mode()
    def _step(self) -> bool:
        if self._current is not None and self._current.finished:
            self._current = None
        while self._current is None and self._queue:
            sequence = self._queue.popleft()
            if not sequence.finished:
                self._current = sequence
                self._prefill(sequence)
        if self._current is not None and not self._current.finished:
            sequence = self._current
            logits = self.forward(torch.tensor([[sequence.tokens[-1]]], device=self.device), self._pos,
                                  last_logits_only=True)
            self._pos += 1
            self._pick(sequence, logits[0, -1])
        return bool(self._queue) or (self._current is not None and not self._current.finished)

    def _prefill(self, sequence: Sequence) -> None:
        sequence.generator = torch.Generator(self.device).manual_seed(sequence.params.seed)
        prompt = torch.tensor([sequence.prompt_tokens], device=self.device)
        echo = sequence.params.echo_logprobs
        logits = self.forward(prompt, 0, last_logits_only=not echo)[0]
        self._pos = len(sequence.prompt_tokens)
        if echo:
            sequence.prompt_logprobs.append(None)
            sequence.prompt_top_logprobs.append(None)
            for position, token in enumerate(sequence.prompt_tokens[1:]):
                logprob, top = self._logprobs(logits[position], token, sequence.params.top_logprobs)
                sequence.prompt_logprobs.append(logprob)
                sequence.prompt_top_logprobs.append(top)
        if sequence.params.max_tokens == 0:
            self._finish(sequence, "length")
        else:
            self._pick(sequence, logits[-1])

    def _pick(self, sequence: Sequence, logits: torch.Tensor) -> None:
        params = sequence.params
        if params.temperature > 0:
            probs = torch.softmax(logits[None] / params.temperature, dim=-1)
            token = sample_top_p(probs, params.top_p, sequence.generator).reshape(-1)
        else:
            token = torch.argmax(logits, dim=-1, keepdim=True)
        if self._group is not None:
            dist.broadcast(token, src=0)
        token = int(token)
        if token in self.tokenizer.stop_tokens:
            sequence.stop_token = token
            return self._finish(sequence, "stop")
        if params.logprobs or params.top_logprobs:
            logprob, top = self._logprobs(logits, token, params.top_logprobs)
            sequence.logprobs.append(logprob)
            sequence.top_logprobs.append(top)
        sequence.tokens.append(token)
        if (len(sequence.tokens) == params.max_tokens
                or len(sequence.prompt_tokens) + len(sequence.tokens) >= self.model.args.max_seq_len):
            return self._finish(sequence, "length")
        if sequence.on_update is not None:
            sequence.on_update(sequence)

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        values, ids = torch.topk(logprobs, n) if n else (torch.empty(0), torch.empty(0, dtype=torch.long))
        return float(logprobs[token]), list(zip(ids.tolist(), values.tolist()))
