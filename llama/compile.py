"""Compiled decoding: one-token steps through `torch.compile`, everything else eager.

`Transformer.step` with `kv_len=None` has no shape that depends on a position, so one compilation per batch-size
bucket (a power of two, or max_batch_size) serves every position, prompt length and mix of sequences. On CUDA the
step is replayed as a CUDA graph, which removes the per-kernel launch cost that dominates small-batch decoding. On
the CPU the linear layers keep their kernels (`llama.kernels`: `llama.bf16_cpu`'s or oneDNN's for bfloat16, int8)
and inductor fuses the work between them (norms, rope, attention's softmax, SwiGLU); the weights are not frozen
into copies, so every batch-size bucket shares the model's one copy of them.
"""

from typing import Any, Optional

import torch
import torch.distributed as dist

from llama.model import Transformer


class CompiledDecoding:
    """Called like `model.step`: one-token steps over the slots from 0 (the engine's decode steps) go through the
    compiled `model.step`, compiled for each batch-size bucket on its first such step (slow: seconds to minutes);
    prompts run eagerly. The model's caches must be set up (`setup_caches()`) first, and stay in place."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.device = model.norm.weight.device
        if self.device.type == "cuda":
            options: dict[str, Any] = {"mode": "reduce-overhead"}
        elif self.device.type == "cpu":
            options = {}
        else:
            raise ValueError(f"compiled decoding supports CUDA and CPU devices, not {self.device.type}")
        if model.rope is None:
            raise ValueError("compiled decoding needs the model's caches; call model.setup_caches() first")
        # Static addresses: CUDA graphs then update the caches in place instead of copying them at every replay.
        for layer in model.layers:
            torch._dynamo.mark_static_address(layer.attention.kv_cache.k)
            torch._dynamo.mark_static_address(layer.attention.kv_cache.v)
        # Collectives under model parallelism may need graph breaks; a single process must compile whole.
        single = not dist.is_initialized() or dist.get_world_size() == 1
        self._step = torch.compile(model.step, dynamic=False, fullgraph=single, **options)

    def __call__(self, tokens: torch.Tensor, start_pos: torch.Tensor, slot: "int | torch.Tensor" = 0,
                 kv_len: Optional[int] = None, last_logits_only: bool = False,
                 seq_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != 1 or not isinstance(slot, int) or slot != 0 or seq_lens is not None:
            return self.model.step(tokens, start_pos, slot, kv_len, last_logits_only, seq_lens)
        self.model.check_inputs(tokens, start_pos, slot, kv_len)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # earlier steps' outputs are no longer needed
        bsz, max_seq_len = tokens.shape[0], self.model.args.max_seq_len
        bucket = min(1 << (bsz - 1).bit_length(), self.model.args.max_batch_size)
        # Padding rows write their keys and values at the last position of their slots: real data goes there only
        # from a prompt that fills the whole context, in the prefill call that ends it, after which nothing reads
        # it; any other sequence writes that position itself before it reads it. Nor is it ever part of a reused
        # prefix: a reused prefix is at most a prompt's length - 1 <= max_seq_len - 1 positions, and a free slot's
        # cached tokens stop short of it (llama.prefix_cache). The copies also give fresh
        # contiguous inputs (a column sliced from a longer buffer has strides that change, and would compile
        # again). The output is copied: a CUDA graph's next replay overwrites the one it returned. Reading the
        # whole cache (kv_len None) gives the same logits as reading [0, kv_len).
        padded_tokens = tokens.new_zeros(bucket, 1)
        padded_tokens[:bsz] = tokens
        positions = start_pos.new_full((bucket,), max_seq_len - 1)
        positions[:bsz] = start_pos
        with torch.inference_mode():
            return self._step(padded_tokens, positions)[:bsz].clone()
