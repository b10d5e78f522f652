"""Compiled decoding: one-token decode steps through `torch.compile`, everything else eager.

`Transformer.decode_step` has no shape that depends on a position, so one compilation per batch-size bucket (a
power of two, or max_batch_size) serves every position, prompt length and mix of sequences. On CUDA the step is
replayed as a CUDA graph, which removes the per-kernel launch cost that dominates small-batch decoding. On the
CPU the linear layers keep their kernels (`llama.kernels`: oneDNN's packed bfloat16, int8) and inductor fuses the
work between them (norms, rope, attention's softmax, SwiGLU); the weights are not frozen into copies, so every
batch-size bucket shares the model's one copy of them.
"""

from typing import Any

import torch
import torch.distributed as dist

from llama.model import Transformer


class CompiledDecoding:
    """Called like `model(tokens, start_pos, slot=..., last_logits_only=...)`: one-token steps after a prompt go
    through a compiled `model.decode_step`, compiled for each batch-size bucket on its first step (slow: seconds to
    minutes)."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.device = model.norm.weight.device
        if self.device.type == "cuda":
            options: dict[str, Any] = {"mode": "reduce-overhead"}
        elif self.device.type == "cpu":
            options = {}
        else:
            raise ValueError(f"compiled decoding supports CUDA and CPU devices, not {self.device.type}")
        # Collectives under model parallelism may need graph breaks; a single process must compile whole.
        single = not dist.is_initialized() or dist.get_world_size() == 1
        self._step = torch.compile(model.decode_step, dynamic=False, fullgraph=single, **options)
        self._static_caches: list[torch.Tensor] = []  # the caches the compiled step was told stay in place
        self._positions = torch.arange(model.args.max_seq_len, device=self.device)

    def __call__(
        self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, *, slot: int = 0, last_logits_only: bool = False
    ) -> torch.Tensor:
        if isinstance(start_pos, int):
            if tokens.shape[1] != 1 or start_pos == 0 or slot != 0 or not last_logits_only:
                return self.model(tokens, start_pos, slot=slot, last_logits_only=last_logits_only)
            self.model.check_inputs(tokens, start_pos)
            start_pos = self._positions[start_pos].expand(tokens.shape[0])  # every row at the same position
        if not self._caches_ready():
            return self.model(tokens, start_pos)
        self.model.check_inputs(tokens, 0)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # earlier steps' outputs are no longer needed
        bsz = tokens.shape[0]
        bucket = min(1 << (bsz - 1).bit_length(), self.model.args.max_batch_size)
        # Padding rows write their keys and values at the last position of their slots: real data goes there only
        # from a prompt that fills the whole context, in the prefill call that ends it, after which nothing reads
        # it; any other sequence writes that position itself before it reads it. The copies also give fresh
        # contiguous inputs (a column sliced from a longer buffer has strides that change, and would compile
        # again). The output is copied: a CUDA graph's next replay overwrites the one it returned.
        padded_tokens = tokens.new_zeros(bucket, 1)
        padded_tokens[:bsz] = tokens
        positions = self._positions.new_full((bucket,), self.model.args.max_seq_len - 1)
        positions[:bsz] = start_pos
        with torch.inference_mode():
            return self._step(padded_tokens, positions)[:bsz].clone()

    def _caches_ready(self) -> bool:
        """Whether a prompt has filled the KV caches on this device; tells dynamo they keep their addresses."""
        caches = [c for layer in self.model.layers for c in (layer.attention.cache_k, layer.attention.cache_v)]
        if any(c is None or c.device != self.device for c in caches):
            return False
        if len(caches) != len(self._static_caches) or any(a is not b for a, b in zip(caches, self._static_caches)):
            # Marked static, CUDA graphs may update the caches in place instead of copying them at every replay.
            for cache in caches:
                torch._dynamo.mark_static_address(cache)
            self._static_caches = caches
        return True
