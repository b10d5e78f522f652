"""Tensor parallelism in Meta's layout: the process group, and each process's share of a model.

Under torchrun every process holds one share of every layer, as Meta's checkpoint shards do
(`llama.checkpoint.layout`): the embedding and output rows of a slice of the vocabulary, the q/k/v, w1 and w3 rows
of some heads and hidden units, and the matching wo and w2 columns. Applied from outside a plain `Transformer`:

    shard_model(model, rank, world_size)    # on the meta device, before loading: this process's shapes
    ... load this process's tensors ...
    join_shards(model)                       # collectives that combine the shares in each forward

The collectives are fairscale's (`reduce_from_model_parallel_region`, `gather_from_model_parallel_region`), on the
model-parallel group that `setup_model_parallel` creates.
"""

import atexit
import os
import socket
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from fairscale.nn.model_parallel.initialize import (
    get_model_parallel_world_size,
    initialize_model_parallel,
    model_parallel_is_initialized,
)
from fairscale.nn.model_parallel.mappings import gather_from_model_parallel_region, reduce_from_model_parallel_region
from torch import nn

from llama.checkpoint.layout import check_model_parallel_size, n_local_kv_heads
from llama.model import Transformer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_model_parallel(device: torch.device, model_parallel_size: Optional[int] = None) -> None:
    """Join torchrun's process group (or make a one-process group) and split it into model-parallel ranks."""
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend)
        else:  # a plain `python` process or a notebook
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    world_size = dist.get_world_size()
    if world_size > 1:
        atexit.unregister(_leave_process_groups)  # registered once, however many models a process builds
        atexit.register(_leave_process_groups)
    if model_parallel_size is not None and model_parallel_size != world_size:
        raise ValueError(
            f"model_parallel_size={model_parallel_size} but {world_size} processes were launched; "
            f"launch with torchrun --nproc_per_node {model_parallel_size} (or omit model_parallel_size)"
        )
    if model_parallel_is_initialized():
        if get_model_parallel_world_size() != world_size:
            raise ValueError(
                f"model parallelism is already set up with size {get_model_parallel_world_size()}, "
                f"not {world_size}; use one size per process"
            )
    else:
        initialize_model_parallel(world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)


def _leave_process_groups() -> None:
    """Tear the process groups down before the interpreter's own teardown: gloo's threads still running then can
    abort a process ("terminate called without an active exception")."""
    if dist.is_initialized():
        dist.destroy_process_group()


class VocabParallelEmbedding(nn.Module):
    """This process's rows [start, start + rows) of the embedding; other tokens look up zeros (the all-reduce that
    `join_shards` adds fills them in from the process that holds them)."""

    def __init__(self, start: int, rows: int, dim: int) -> None:
        super().__init__()
        self.start = start
        self.weight = nn.Parameter(torch.empty(rows, dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        held = (local >= 0) & (local < self.weight.shape[0])
        rows = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return rows * held.unsqueeze(-1).to(rows.dtype)


def _local_linear(in_features: int, out_features: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False, device=like.weight.device, dtype=like.weight.dtype)


def shard_model(model: Transformer, rank: int, world_size: int) -> None:
    """Shrink `model` (built on the meta device) to the shapes of process `rank`'s share of `world_size`."""
    args = model.args
    check_model_parallel_size(args, world_size)
    if world_size == 1:
        return
    n_heads, n_kv_heads, head_dim = args.n_heads // world_size, n_local_kv_heads(args, world_size), args.head_dim
    hidden, vocab = args.ffn_hidden_dim // world_size, args.vocab_size // world_size
    for layer in model.layers:
        attention, feed_forward = layer.attention, layer.feed_forward
        attention.n_heads, attention.n_kv_heads = n_heads, n_kv_heads
        attention.wqkv = _local_linear(args.dim, (n_heads + 2 * n_kv_heads) * head_dim, attention.wqkv)
        attention.wo = _local_linear(n_heads * head_dim, args.dim, attention.wo)
        feed_forward.w13 = _local_linear(args.dim, 2 * hidden, feed_forward.w13)
        feed_forward.w2 = _local_linear(hidden, args.dim, feed_forward.w2)
    model.output = _local_linear(args.dim, vocab, model.output)
    with torch.device(model.tok_embeddings.weight.device):
        model.tok_embeddings = VocabParallelEmbedding(rank * vocab, vocab, args.dim)


def _all_reduce(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return reduce_from_model_parallel_region(output)


def _all_gather(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
    return gather_from_model_parallel_region(output)


def join_shards(model: Transformer, world_size: int) -> None:
    """Add the collectives that combine the shares of `world_size` processes: partial sums after the embedding,
    wo and w2 are added up, and each process's slice of the logits is gathered into the whole vocabulary."""
    if world_size == 1:
        return
    model.tok_embeddings.register_forward_hook(_all_reduce)
    for layer in model.layers:
        layer.attention.wo.register_forward_hook(_all_reduce)
        layer.feed_forward.w2.register_forward_hook(_all_reduce)
    model.output.register_forward_hook(_all_gather)
