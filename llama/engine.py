"""`Engine`: continuous batching. Each sequence lives in one of the model's `max_batch_size` KV slots; every step
feeds one new token of every running sequence, each at its own position, and new requests join between steps.

One `step()`:
1. take the new submissions and cancellations (under torchrun rank 0's, broadcast to every rank);
2. finish the cancelled sequences and admit queued ones into free slots, each into the slot that holds the longest
   prefix of its prompt, or with that prefix copied from another slot (llama.prefix_cache): a slot keeps the
   keys and values of its last sequence until it is needed;
3. prefill the rest of the prompts, several in one forward call (llama.prefill_plan), at most `prefill_chunk`
   tokens (rows x padded width) a step while other sequences decode (so they are not stalled for long), all
   admitted prompts when none does; a prompt's last chunk gives its first token;
4. one decode step over the slots [0, highest decoding slot], each row at its own position;
5. pick each sequence's token (rank 0; the tokens are broadcast) from its logits row after its own logit_bias,
   penalties and grammar mask (llama.logits_processing, which computes the masks during the forward pass where it
   leaves processors idle), with its own temperature, top_p and generator, and report every sequence that got a
   token or finished to its `on_update`.
"""

import dataclasses
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist

from llama.logits_processing import LogitsProcessing, PendingMasks
from llama.model import Transformer
from llama.prefill_plan import plan_prefill
from llama.prefix_cache import PrefixCache
from llama.prompt_lookup import TOKEN_BUDGET, PromptLookup, verify
from llama.request import Request, SamplingParams, TopLogprobs, check_prompt
from llama.sampling import check_bool, check_int
from llama.tokenizer import Tokenizer

# Followers wait for rank 0's next plan for as long as a server stays idle.
PLAN_TIMEOUT = timedelta(days=365)


@dataclass
class EngineStats:
    """Running totals since the engine was made, for monitoring (the server's /metrics reports them)."""

    prefix_queried_tokens: int = 0  # prompt tokens of admitted sequences, looked up among the cached prefixes
    prefix_hit_tokens: int = 0  # of those, the ones whose keys and values were reused rather than computed
    drafts: int = 0  # prompt-lookup proposals verified (one per sequence and step that proposed any token)
    draft_tokens: int = 0  # tokens proposed in them
    accepted_tokens: int = 0  # proposed tokens that the model's own picks confirmed


class Engine:
    """Runs every submitted sequence to its end, sharing decode steps between them (see the module docstring).

    `forward` computes logits as `Transformer.step` does: the model's own step (the default), or compiled
    decoding around it (`llama.compile`); tests and benchmarks may replace `engine.forward` to observe or steer
    it. The model's caches must be set up. Under torchrun rank 0 calls `step()`, the others `follow()`; or every
    rank calls the same methods in the same order (ranks > 0 then follow rank 0's plan). `prefix_reuse` False
    computes every prompt in full (the same tokens; logprobs equal to within float rounding).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, generator: torch.Generator,
                 forward: Optional[Callable[..., torch.Tensor]] = None, prefill_chunk: int = 512,
                 prefix_reuse: bool = True, prompt_lookup: int = 0) -> None:
        check_int("prefill_chunk", prefill_chunk)
        check_int("prompt_lookup", prompt_lookup, minimum=0)
        check_bool("prefix_reuse", prefix_reuse)
        self.forward = forward if forward is not None else model.step
        self._model = model
        self._checksums: dict[int, float] = {}  # of each free slot's cached keys, when its sequence ended
        self.prefix = PrefixCache(model.args.max_batch_size, model.args.max_seq_len, enabled=prefix_reuse)
        self.args, self.generator = model.args, generator
        self.stop_tokens = tokenizer.stop_tokens
        self.device = model.norm.weight.device
        self.processing = LogitsProcessing(tokenizer, self.args.vocab_size, self.device)
        self.prefill_chunk = prefill_chunk
        self.stats = EngineStats()
        # Drafts of up to `prompt_lookup` tokens per sequence and decode step (llama.prompt_lookup); 0: none.
        self.lookup = PromptLookup(prompt_lookup, TOKEN_BUDGET) if prompt_lookup else None
        self.slots: list[Optional[Request]] = [None] * self.args.max_batch_size
        self.queue: deque[Request] = deque()
        self.running: list[Request] = []  # in order of admission: prompts are prefilled first come, first served
        self._lock = threading.Lock()  # guards what other threads add to: submissions, cancellations, ids
        self._step_lock = threading.Lock()  # one step at a time
        self._submitted: list[Request] = []
        self._cancelled: list[int] = []
        self._next_id = 0
        self._world = dist.get_world_size() if dist.is_initialized() else 1
        self._rank = dist.get_rank() if dist.is_initialized() else 0
        # A gloo group carries the plans whatever the backend (nccl cannot broadcast Python objects from the CPU).
        self._plan_group = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT) if self._world > 1 else None

    def submit(self, prompt_tokens: list[int], params: SamplingParams,
               on_update: Optional[Callable[[Request], None]] = None) -> Request:
        """Queue a sequence (thread-safe); it is admitted into a free KV slot at the start of a later step()."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
        params.check()
        prompt_tokens = check_prompt(prompt_tokens, params.max_tokens, self.args)
        matcher = self.processing.check(params)  # every rank that submits refuses the same requests
        with self._lock:
            if params.seed is None:
                seed = torch.randint(2**62, (), generator=self.generator, device=self.generator.device)
                params = dataclasses.replace(params, seed=int(seed))
            sequence = Request(prompt_tokens, params, on_update, id=self._next_id,
                               matcher=matcher if self._rank == 0 else None)
            self._next_id += 1
            self._submitted.append(sequence)
        return sequence

    def cancel(self, sequence: Request) -> None:
        """Stop `sequence` (thread-safe): at the next step it finishes as "cancelled" and frees its slot. Ranks
        > 0 follow rank 0's cancellations."""
        with self._lock:
            if self._rank == 0 and not sequence.finished:
                self._cancelled.append(sequence.id)

    def step(self) -> bool:
        """Run one iteration (see the module docstring); True while any work remains (queued or running)."""
        with self._step_lock:
            with self._lock:
                submitted, self._submitted = self._submitted, []
                cancelled, self._cancelled = self._cancelled, []
            if not (submitted or cancelled or self.queue or self.running):
                return False
            if self._world > 1:
                submitted, cancelled = self._share_plan(submitted, cancelled)
            self._run(submitted, cancelled)
            return bool(self.queue or self.running)

    def follow(self) -> None:
        """On ranks > 0: run the steps rank 0 runs, until rank 0 calls `shutdown()`."""
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0, group=self._plan_group)
            if message[0] is None:
                return
            with self._step_lock:
                self._run(self._adopt(message[0][0], []), message[0][1])

    def ping(self) -> None:
        """On rank 0 under torchrun: send the other ranks an empty plan, which they run as a step without work. A
        server calls it while idle, when no other collective would notice a rank that stopped: the broadcast
        raises torch.distributed's RuntimeError once a peer's connection is closed."""
        if self._world > 1 and self._rank == 0:
            with self._step_lock:
                self._share_plan([], [])

    def shutdown(self) -> None:
        """On rank 0: end the other ranks' `follow()`."""
        if self._world > 1 and self._rank == 0:
            dist.broadcast_object_list([None], src=0, group=self._plan_group)

    def _share_plan(self, submitted: list[Request], cancelled: list[int]) -> tuple[list[Request], list[int]]:
        """Rank 0's new sequences and cancellations, which every rank then runs."""
        message: list[Any] = [None]
        if self._rank == 0:
            message = [([(s.id, s.prompt_tokens, s.params) for s in submitted], cancelled)]
        dist.broadcast_object_list(message, src=0, group=self._plan_group)
        if self._rank == 0:
            return submitted, cancelled
        return self._adopt(message[0][0], submitted), message[0][1]

    def _adopt(self, plan: list[tuple[int, list[int], SamplingParams]], local: list[Request]) -> list[Request]:
        """Rank 0's new sequences, as this rank's own submissions in the same order where it made them."""
        adopted = []
        for sequence_id, prompt_tokens, params in plan:
            sequence = local.pop(0) if local else Request(prompt_tokens, params)
            sequence.id, sequence.prompt_tokens, sequence.params = sequence_id, prompt_tokens, params
            adopted.append(sequence)
        with self._lock:
            self._submitted[:0] = local  # not in rank 0's plan yet
        return adopted

    @torch.inference_mode()
    def _run(self, submitted: list[Request], cancelled: list[int]) -> None:
        self.queue.extend(submitted)
        updated = [s for s in [*self.queue, *self.running] if s.id in cancelled]
        for sequence in updated:
            self._finish(sequence, "cancelled")
        updated += self._admit()
        decoding = [s for s in self.running if s.filled >= len(s.prompt_tokens)]
        updated += self._prefill(budget=self.prefill_chunk if decoding else None)
        if decoding:
            self._decode(decoding)
        for sequence in dict.fromkeys(updated + decoding):
            if sequence.on_update is not None:
                sequence.on_update(sequence)

    def _admit(self) -> list[Request]:
        """Move queued sequences into free slots, each starting with as much of its prompt's keys and values as
        a slot holds (see `PrefixCache.place`; prompt scoring needs every position's logits, so reuses nothing)."""
        finished = []
        if self.queue and self.prefix.enabled:  # once a step: admitting writes no free slot's cached positions
            self._forget_overwritten([slot for slot, held in enumerate(self.slots) if held is None])
        while self.queue and None in self.slots:
            sequence = self.queue.popleft()
            if sequence.params.max_tokens == 0 and not sequence.params.echo_logprobs:
                self._finish(sequence, "length")  # nothing to compute
                finished.append(sequence)
                continue
            reuse = not sequence.params.echo_logprobs
            free = [slot for slot, held in enumerate(self.slots) if held is None]
            running = {s.slot: (s.prompt_tokens + s.tokens)[: s.filled] for s in self.running} if reuse else {}
            placement = self.prefix.place(sequence.prompt_tokens, free, running, reuse)
            if placement.source is not None:
                self._model.copy_prefix(placement.source, placement.slot, placement.reused)
            if reuse and self.prefix.enabled:
                self.stats.prefix_queried_tokens += len(sequence.prompt_tokens)
                self.stats.prefix_hit_tokens += placement.reused
            sequence.slot, sequence.filled = placement.slot, placement.reused
            self.slots[sequence.slot] = sequence
            self.running.append(sequence)
            if sequence.params.temperature > 0 and self._rank == 0:
                sequence.generator = torch.Generator(self.device).manual_seed(sequence.params.seed)
        return finished

    def _prefill(self, budget: Optional[int]) -> list[Request]:
        """Prefill admitted prompts in forward calls of at most `prefill_chunk` rows x padded width, `budget` of
        that in all (None: no limit); the sequences whose prompt is now complete."""
        completed = []
        while budget is None or budget > 0:
            prefilling = [s for s in self.running if s.filled < len(s.prompt_tokens)]
            if not prefilling:
                break
            # Prompt scoring (all logits) and the rest (last logits only) take separate calls, in order of admission.
            prefilling = [s for s in prefilling if s.params.echo_logprobs == prefilling[0].params.echo_logprobs]
            area = self.prefill_chunk if budget is None else min(budget, self.prefill_chunk)
            rows, width = plan_prefill([(s.filled, len(s.prompt_tokens) - s.filled) for s in prefilling], area,
                                       self.args.max_seq_len)
            batch = [(prefilling[i], size) for i, size in rows]
            self._prefill_rows(batch, width)
            completed += [s for s, _ in batch if s.filled == len(s.prompt_tokens)]
            if budget is not None:
                budget -= len(rows) * width
        return completed

    def _prefill_rows(self, batch: list[tuple[Request, int]], width: int) -> None:
        """One forward call that prefills the next `size` prompt tokens of each (sequence, size) of `batch`, each
        row padded to `width`; a prompt's last chunk gives its first token (or ends it, for max_tokens 0)."""
        sequences, echo = [s for s, _ in batch], batch[0][0].params.echo_logprobs
        ending = [s for s, size in batch if s.filled + size == len(s.prompt_tokens) and s.params.max_tokens > 0]
        pending = self.processing.start(ending) if ending else None
        starts = [s.filled for s in sequences]
        tokens = [s.prompt_tokens[s.filled : s.filled + size] + [0] * (width - size) for s, size in batch]
        slots = [s.slot for s in sequences]
        # Neighbouring slots are a view of the cache; others need a tensor of slots (each layer copies their rows).
        slot: Any = slots[0] if slots == list(range(slots[0], slots[0] + len(slots))) else torch.tensor(
            slots, device=self.device)
        ragged = {"seq_lens": torch.tensor([size for _, size in batch], device=self.device)} if any(
            size < width for _, size in batch) else {}
        logits = self.forward(torch.tensor(tokens, device=self.device), torch.tensor(starts, device=self.device),
                              slot=slot, kv_len=max(starts) + width, last_logits_only=not echo, **ragged)
        last = {}  # each ending sequence's logits row at its last prompt token
        for row, (sequence, size) in enumerate(batch):
            sequence.filled += size
            if echo:
                self._score_prompt(sequence, logits[row, :size], starts[row])
            last[sequence] = logits[row, size - 1 if echo else -1]
            if sequence.filled == len(sequence.prompt_tokens) and sequence.params.max_tokens == 0:
                self._finish(sequence, "length")
        if ending:
            rows = torch.stack([last[s] for s in ending])
            for sequence, token, row in zip(ending, self._pick(rows, ending, pending), rows):
                self._append(sequence, token, row)

    def _score_prompt(self, sequence: Request, logits: torch.Tensor, start: int) -> None:
        """Record the logprobs of the prompt tokens that the chunk's logits (size, vocab) at `start` predict."""
        if start == 0:  # nothing predicts the first token
            sequence.prompt_logprobs.append(None)
            sequence.prompt_top_logprobs.append(None)
        targets = sequence.prompt_tokens[start + 1 : start + 1 + logits.shape[0]]
        logits = logits[: len(targets)]
        # log p = logit - logsumexp(row): the rows' normalizers alone, rather than log_softmax's copy of every
        # logit (a 512-token chunk's is 0.26 GB with Llama 3's vocabulary), which only a few values are read from.
        normalizers = torch.logsumexp(logits, dim=-1, keepdim=True)  # (len(targets), 1)
        chosen = logits.gather(-1, torch.tensor(targets, device=self.device)[:, None]) - normalizers
        sequence.prompt_logprobs += chosen[:, 0].tolist()
        if n := sequence.params.top_logprobs:
            values, ids = torch.topk(logits, n)
            sequence.prompt_top_logprobs += [list(zip(i, v)) for i, v in zip(ids.tolist(),
                                                                               (values - normalizers).tolist())]

    def _decode(self, decoding: list[Request]) -> None:
        """One token for every decoding sequence, or more where its prompt-lookup draft is confirmed (see
        llama.prompt_lookup): rows are slots [0, span), each fed its last token and its draft, padded to the longest
        draft. A row without a decoding sequence writes past what its slot holds (a prompt's first unfilled
        position, or a free slot's cached tokens), and a draft's padding and rejected tokens past the valid ones:
        all of that is written again before anything reads it. Attention reads only as far as the decoding rows
        need."""
        span = max(s.slot for s in decoding) + 1
        drafts: list[list[int]] = [[] for _ in decoding]
        if self.lookup is not None:  # every row's positions must stay within the context (free slots' adapt)
            room = min(self.args.max_seq_len - s.filled for s in self.slots[:span] if s is not None)
            drafts = self.lookup.drafts(decoding, self.lookup.width(span, room), self.args.max_seq_len)
        width = 1 + max(map(len, drafts))
        positions = [s.filled if s is not None else self.prefix.scratch_position(i, width)
                     for i, s in enumerate(self.slots[:span])]
        tokens = [[0] * width for _ in range(span)]
        for sequence, draft in zip(decoding, drafts):
            tokens[sequence.slot][: 1 + len(draft)] = [sequence.tokens[-1], *draft]
        pending = self.processing.start(decoding)  # the grammars' masks, computed meanwhile where that pays
        logits = self.forward(torch.tensor(tokens, device=self.device), torch.tensor(positions, device=self.device),
                              kv_len=max(s.filled for s in decoding) + width)
        rows = logits[[s.slot for s in decoding]]  # (len(decoding), width, vocab)
        for sequence, kept, draft, row in zip(decoding, self._verify(rows, decoding, pending, drafts), drafts, rows):
            for position, token in enumerate(kept):
                sequence.filled += 1  # the KV of the token before this one is now valid
                self._append(sequence, token, row[position])
                if sequence.finished:
                    break
            if draft:
                self._count_draft(sequence, draft, min(len(kept) - 1, position + 1))

    def _count_draft(self, sequence: Request, draft: list[int], accepted: int) -> None:
        self.stats.drafts += 1
        self.stats.draft_tokens += len(draft)
        self.stats.accepted_tokens += accepted
        self.lookup.record(sequence, draft, accepted)

    def _pick(self, logits: torch.Tensor, sequences: list[Request], pending: Optional[PendingMasks]) -> list[int]:
        """The next token of each sequence from its logits row (n, vocab) once its own logits processing applied
        (with the grammar masks `pending`); rank 0 picks, every rank gets them."""
        return [kept[0] for kept in self._verify(logits[:, None], sequences, pending, [[]] * len(sequences))]

    def _verify(self, logits: torch.Tensor, sequences: list[Request], pending: Optional[PendingMasks],
                drafts: list[list[int]]) -> list[list[int]]:
        """The tokens each sequence keeps from its logits (n, 1 + T, vocab) at its last token and its draft, once
        its own logits processing applied (with the grammar masks `pending`): the draft tokens its own picks
        confirm and the pick after them (llama.prompt_lookup.verify); without a draft, its next token. Rank 0
        picks; it sends the outcome to every rank as one (n, 1 + T) tensor, -1 beyond each row's tokens."""
        kept = torch.full(logits.shape[:2], -1, dtype=torch.long, device=self.device)
        if self._rank == 0:
            first = self.processing.apply(logits[:, 0], sequences, pending)
            for row, (sequence, draft) in enumerate(zip(sequences, drafts)):
                processed = first[row : row + 1]
                if draft:  # logit_bias is the only processing of a drafting sequence, the same at every position
                    rest = self.processing.apply(logits[row, 1 : 1 + len(draft)], [sequence] * len(draft), None)
                    processed = torch.cat([processed, rest])
                params = sequence.params
                picked = verify(processed, draft, params.temperature, params.top_p, sequence.generator)
                kept[row, : len(picked)] = torch.tensor(picked)
        if self._world > 1:
            # Ranks hold bit-identical logits, but a single diverging pick would desynchronise them for good.
            dist.broadcast(kept, src=0)
        return [[t for t in row if t >= 0] for row in kept.tolist()]

    def _append(self, sequence: Request, token: int, logits: torch.Tensor) -> None:
        """Add a picked token (with its logprobs, from the logits it was picked from), or finish at a stop token."""
        if token in self.stop_tokens:
            sequence.stop_token = token
            self._finish(sequence, "stop")
            return
        sequence.tokens.append(token)
        self.processing.advance(sequence, token)
        params = sequence.params
        if params.logprobs or params.top_logprobs:
            logprobs = torch.log_softmax(logits, dim=-1)
            if params.logprobs:
                sequence.logprobs.append(logprobs[token].item())
            if params.top_logprobs:
                sequence.top_logprobs.append(_top(logprobs, params.top_logprobs))
        if len(sequence.tokens) == params.max_tokens or sequence.filled + 1 >= self.args.max_seq_len:
            self._finish(sequence, "length")

    def _checksum(self, slot: int, length: int) -> float:
        """The sum of the first layer's cached keys at positions [0, length) of `slot`."""
        return self._model.layers[0].attention.kv_cache.k[slot, :length].float().sum().item()

    def _forget_overwritten(self, free: list[int]) -> None:
        """Drop the cached prefix of each free slot whose keys changed since its sequence ended: something wrote
        them behind the engine's back (Meta's `forward`, a direct `model.step`, another engine on the same model,
        `setup_caches()`), and they must not be reused. The engine itself never writes a free slot's cached
        positions."""
        for slot in free:
            held = len(self.prefix.cached[slot])
            if held and self._checksum(slot, held) != self._checksums.get(slot):
                self.prefix.forget(slot)

    def _finish(self, sequence: Request, reason: str) -> None:
        """End `sequence` and give its slot back at once; the slot keeps the keys and values it filled."""
        sequence.finish_reason = reason
        sequence.generator = sequence.matcher = None
        if sequence in self.queue:
            self.queue.remove(sequence)
        if sequence.slot is not None:
            kept = self.prefix.release(sequence.slot, (sequence.prompt_tokens + sequence.tokens)[: sequence.filled])
            if self.prefix.enabled:
                self._checksums[sequence.slot] = self._checksum(sequence.slot, kept)
            self.running.remove(sequence)
            self.slots[sequence.slot] = None
            sequence.slot = None


def _top(logprobs: torch.Tensor, n: int) -> TopLogprobs:
    """The `n` most likely tokens of a logprobs row (vocab,), with their logprobs."""
    values, ids = torch.topk(logprobs, n)
    return list(zip(ids.tolist(), values.tolist()))
