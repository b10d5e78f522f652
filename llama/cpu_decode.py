"""A bfloat16 model on an x86 CPU with AVX-512 BF16, computing through `llama.bf16_cpu`'s kernels beyond its linear
layers (`llama.kernels`): `use_cpu_kernels` gives each attention layer a one-call decode step, each RMSNorm and
SwiGLU one call, and each transformer block whose linear layers' kernels can be called by address a one-token
decode step in a single call (`Bf16TransformerBlock`), the same numbers as its modules without the Python between
them. The model itself stays as `llama.model` defines it: these are subclasses swapped in after loading.
"""

import ctypes
from typing import Optional

import torch
from torch import nn

from llama import bf16_cpu, blocks_cpu, int8_cpu
from llama.int4 import Int4Linear, Q8BlockLinear
from llama.kernels import Bf16Linear, Int8Linear
from llama.model import Attention, FeedForward, RMSNorm, TransformerBlock


class Bf16RMSNorm(RMSNorm):
    """`RMSNorm` computed eagerly in one call by `llama.bf16_cpu` (the same bfloat16 numbers as its own five
    operations); compiled code, where inductor fuses them, and other dtypes take RMSNorm's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None if torch.compiler.is_compiling() else bf16_cpu.rms_norm(x, self.weight, self.eps)
        return super().forward(x) if out is None else out


class Bf16FeedForward(FeedForward):
    """`FeedForward` with silu(gate) * up in one call of `llama.bf16_cpu` eagerly (torch's numbers, see
    `bf16_cpu.silu_mul`); compiled code, where inductor fuses them, and other dtypes and devices take its own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or x.dtype != torch.bfloat16 or x.device.type != "cpu":
            return super().forward(x)
        return self.w2(bf16_cpu.silu_mul(self.w13(x)))


def bf16_decode_step(attention: Attention, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                     mask: Optional[torch.Tensor], slot: "int | torch.Tensor",
                     kv_len: Optional[int]) -> Optional[torch.Tensor]:
    """`Attention.decode_step` in `llama.bf16_cpu`'s kernels: rope and KV-cache write in one call, attention in
    another, around the layer's own wqkv and wo. None for rows in scattered slots (a tensor `slot`: a one-token
    chunk of a prompt), which the layer computes itself."""
    if isinstance(slot, torch.Tensor):
        return None
    cache, rows = attention.kv_cache, x.shape[0]
    q = bf16_cpu.rope_and_store(attention.wqkv(x), rope, positions, cache.k, cache.v, slot, attention.n_heads)
    end = cache.k.shape[1] if kv_len is None else kv_len
    keys, values = cache.k[slot:slot + rows, :end], cache.v[slot:slot + rows, :end]
    out = bf16_cpu.decode_attention(q, keys, values, mask)
    if out is None:  # a layout the kernel does not take
        out = attention._decode_attention(q, keys, values, mask)
    return attention.wo(out.view(rows, 1, -1))


class Bf16TransformerBlock(TransformerBlock):
    """`TransformerBlock` whose eager one-token decode steps of contiguous KV slots run in one call of
    `llama.bf16_cpu` (`decode_layer`: the same numbers as its modules, without a Python call per operation), where
    `plan` is set (see `decode_plan`). Prompts, scattered slots, compiled code, and a block whose modules have been
    replaced or carry forward hooks since the plan was made (tensor parallelism's collectives, a researcher's
    probes) take its own forward, so that nothing is skipped."""

    plan: Optional[bf16_cpu.DecodeLayer] = None
    planned: tuple[nn.Module, ...] = ()  # the modules the plan was made from, in `_parts` order

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor, mask: Optional[torch.Tensor],
                slot: "int | torch.Tensor", kv_len: Optional[int]) -> torch.Tensor:
        if (self.plan is None or x.shape[1] != 1 or isinstance(slot, torch.Tensor) or x.dtype != torch.bfloat16
                or x.device.type != "cpu" or torch.compiler.is_compiling() or not self._plan_holds()):
            return super().forward(x, positions, rope, mask, slot, kv_len)
        cache = self.attention.kv_cache
        return bf16_cpu.decode_layer(self.plan, x, positions, rope, mask, cache.k, cache.v, slot, kv_len)

    def _plan_holds(self) -> bool:
        parts = _parts(self)
        if any(part is not planned for part, planned in zip(parts, self.planned)):
            return False
        global_hooks = nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks
        return not global_hooks and not any(part._forward_hooks or part._forward_pre_hooks for part in parts)


def _parts(block: TransformerBlock) -> tuple[nn.Module, ...]:
    attention, feed_forward = block.attention, block.feed_forward
    return (block.attention_norm, attention, attention.wqkv, attention.wo, block.ffn_norm, feed_forward,
            feed_forward.w13, feed_forward.w2)


def decode_plan(block: TransformerBlock) -> Optional[bf16_cpu.DecodeLayer]:
    """What `bf16_cpu.decode_layer` needs of `block`, or None unless its norms and feed-forward are the bfloat16
    kernels' (one epsilon) and each linear layer a `Bf16Linear`, an `Int8Linear` on `int8_cpu`'s kernel or a block
    layer on `blocks_cpu`'s."""
    attention, feed_forward, norms = block.attention, block.feed_forward, (block.attention_norm, block.ffn_norm)
    linears = [attention.wqkv, attention.wo, feed_forward.w13, feed_forward.w2]
    kernels = [_linear_kernel(layer) for layer in linears]
    if (None in kernels or attention.decode_step is not bf16_decode_step or type(feed_forward) is not Bf16FeedForward
            or not all(isinstance(norm, Bf16RMSNorm) for norm in norms) or norms[0].eps != norms[1].eps):
        return None
    dim, hidden = attention.wqkv.weight.shape[1], feed_forward.w2.weight.shape[1]
    addresses = [address for address, _ in kernels]
    weights = [ctypes.addressof(weight) if isinstance(weight, int8_cpu.Weight) else weight for _, weight in kernels]
    plan = bf16_cpu.DecodeLayer(*addresses, *weights, *(norm.weight.data_ptr() for norm in norms), norms[0].eps,
                                attention.head_dim**-0.5, dim, hidden, attention.n_heads, attention.n_kv_heads,
                                attention.head_dim)
    plan.weights = kernels  # int8 layers' `int8_cpu.Weight`s live as long as the plan that points at them
    return plan


def _linear_kernel(layer: nn.Module) -> Optional[tuple[int, "int | ctypes.Structure"]]:
    """The address of `layer`'s bfloat16 kernel and what it takes as the weight (a pointer, or an `int8_cpu.Weight`
    to point at), or None where `layer` has no such kernel."""
    if type(layer) is Bf16Linear and not layer.widen_output:
        return bf16_cpu.linear_address(), layer.packed.data_ptr()
    if type(layer) is Int8Linear and layer.packed is not None:
        weight = int8_cpu.Weight(layer.packed.data_ptr(), layer.scale.data_ptr(), layer.packed.shape[1] * 4)
        return int8_cpu.linear_address(), weight
    if isinstance(layer, (Int4Linear, Q8BlockLinear)) and layer.packed is not None:
        if getattr(layer, "scales_and_zeros", None) is None:  # not torch's int4 layout
            return blocks_cpu.linear_address(layer.packed), layer.packed.data_ptr()
    return None


def use_cpu_kernels(model: nn.Module) -> None:
    """Where `llama.bf16_cpu`'s kernels run and `model` is bfloat16 on the CPU: compute every attention layer's
    decode steps with them (`Attention.decode_step`, where head_dim is a multiple of 16), make every RMSNorm a
    `Bf16RMSNorm` (sharing its weight), every FeedForward a `Bf16FeedForward` (sharing its layers) and every block
    that `decode_plan` takes a `Bf16TransformerBlock`, and have a `Bf16Linear` output layer write the float32
    logits the model returns itself (the same numbers, without a bfloat16 copy of every logit: a prompt scored
    with all its logits allocates a third less). Elsewhere the model is left as it is."""
    like = model.norm.weight
    if like.device.type != "cpu" or like.dtype != torch.bfloat16 or not bf16_cpu.available():
        return
    if isinstance(model.output, Bf16Linear):
        model.output.widen_output = True
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention) and module.head_dim % 16 == 0:
            module.decode_step = bf16_decode_step
        elif type(module) is RMSNorm:
            fused = Bf16RMSNorm(module.weight.shape[0], module.eps)
            fused.weight = module.weight
            model.set_submodule(name, fused)
        elif type(module) is FeedForward:
            with torch.device("meta"):  # its own layers are replaced by the model's at once
                fused = Bf16FeedForward(model.args)
            fused.w13, fused.w2 = module.w13, module.w2
            model.set_submodule(name, fused)
    for index, block in enumerate(model.layers):
        if type(block) is TransformerBlock and (plan := decode_plan(block)) is not None:
            with torch.device("meta"):
                fused = Bf16TransformerBlock(model.args)
            fused.attention, fused.feed_forward = block.attention, block.feed_forward
            fused.attention_norm, fused.ffn_norm, fused.plan = block.attention_norm, block.ffn_norm, plan
            fused.planned = _parts(fused)
            model.layers[index] = fused
