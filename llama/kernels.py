"""How the model's linear layers compute on each device: int8 and int4 weights, and bfloat16 weights packed for
the CPU.

The model itself only holds `nn.Linear` layers. After loading, `linear_kernel` picks what replaces each one:
- `Int8Linear` (`quantize="int8"`): int8 weights with one scale per output channel, about half the memory of
  bfloat16; on x86 CPUs with AVX-512 VNNI they compute through `llama.int8_cpu`'s integer kernel.
- `Int4Linear` (`quantize="int4"`, `llama.int4`): 4-bit weights with a float16 scale and minimum per block of 32
  input values, about a third of bfloat16's memory, computed by `llama.blocks_cpu`'s kernel on x86 CPUs with
  AVX-512 VNNI and by torch's int4 kernels elsewhere (other CPUs, and CUDA).
- `Bf16Linear` (bfloat16 on x86 CPUs with AVX-512 BF16): the weight packed for `llama.bf16_cpu`'s kernel, which
  computes decode steps and prompts alike.
- `PackedLinear` (bfloat16 on other CPUs): the weight in oneDNN's blocked layout, whose matmuls with few rows
  (decoding) read weights much faster than torch's default bfloat16 kernel.
- the plain `nn.Linear` everywhere else.

Weights stored in GGUF's blocks (`llama.block_quant`, checkpoints that `from_gguf` writes) compute in the layer
`block_linear` builds for them; `ConcatLinear` puts side by side the layers of a stacked projection whose parts
are stored in different forms, and `BlockEmbedding` looks the embedding's rows up in such a layer.
"""

import ctypes
import itertools
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import bf16_cpu, blocks_cpu, int8_cpu
from llama.block_quant import Blocks, Q4Blocks
from llama.file_pages import row_chunks
from llama.int4 import Int4Linear, Q8BlockLinear
from llama.model import Attention, FeedForward, RMSNorm, TransformerBlock

# Above this many rows torch's int8 weight-only kernel is slower than dequantizing the weight for a matmul.
INT8_KERNEL_MAX_ROWS = 64
QUANTIZATIONS = ("int8", "int4")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and one scale per output channel (in the weight's dtype): weight ≈ values * scale[:, None].

    Used on each process's own shard, so it works under model parallelism. Read in chunks of rows (float32
    temporaries of ~16 MB, not of the whole matrix); a memory-mapped weight's file pages are let go chunk by chunk.
    """
    values = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    for start, chunk in row_chunks(weight, max(1, (1 << 22) // weight.shape[1])):
        rows = slice(start, start + len(chunk))
        scale[rows] = chunk.abs().amax(dim=1).float().clamp(min=1e-12) / 127
        values[rows] = torch.round(chunk.float() / scale[rows, None])
    return values, scale.to(weight.dtype)


class Int8Linear(nn.Module):
    """x @ weight.T with an int8 weight (out_features, in_features) and per-output-channel scales.

    On a CPU where `llama.int8_cpu` is available, only its packed copy of the weight is kept (`weight` is then a
    shape-only meta parameter) and activations are quantized to int8 per block of 32 values, as llama.cpp's Q8_0
    does. Elsewhere activations keep the model's dtype: on other CPUs torch's int8 weight-only kernel serves up to
    INT8_KERNEL_MAX_ROWS rows, and otherwise the weight is dequantized for an ordinary matmul.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("packed", None, persistent=False)
        if weight.device.type == "cpu" and int8_cpu.available():
            self.weight = nn.Parameter(torch.empty(weight.shape, dtype=torch.int8, device="meta"), requires_grad=False)
            self.packed, scale = _quantize_and_pack(weight)
        else:
            values, scale = quantize_int8(weight)
            self.weight = nn.Parameter(values, requires_grad=False)
        self.register_buffer("scale", scale, persistent=False)  # derived from the weights, not a checkpoint tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            if x.shape[-1] != self.weight.shape[1]:  # the kernel would read past (or short of) the rows it is given
                raise ValueError(f"x has {x.shape[-1]} features but this int8 layer takes {self.weight.shape[1]}")
            if torch.compiler.is_compiling():
                return int8_cpu.int8_linear(x, self.packed, self.scale, self.weight.shape[0])
            return int8_cpu.linear(x, self.packed, self.scale, self.weight.shape[0])  # no operator dispatch
        rows = x.numel() // x.shape[-1]
        if x.device.type == "cpu" and rows < INT8_KERNEL_MAX_ROWS:  # torch's int8 weight-only kernel
            out = torch.ops.aten._weight_int8pack_mm(x.reshape(rows, -1).contiguous(), self.weight, self.scale)
            return out.view(*x.shape[:-1], -1)
        # Long prompts are compute-bound: dequantize and use the regular matmul.
        return F.linear(x, self.weight.to(x.dtype)) * self.scale


def _quantize_and_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`int8_cpu.pack` of `quantize_int8`'s values, and its scales in float32 (what the kernel takes)."""
    scales = []

    def pack_chunk(chunk: torch.Tensor) -> torch.Tensor:
        values, scale = quantize_int8(chunk)
        scales.append(scale.float())
        return int8_cpu.pack(values)

    return _pack_in_chunks(weight, int8_cpu.GROUP_ROWS, pack_chunk), torch.cat(scales)


def _pack_in_chunks(weight: torch.Tensor, group_rows: int, pack_chunk: Callable) -> torch.Tensor:
    """`pack_chunk` of each chunk of whole `group_rows`-row groups of `weight` (~16 M values), in one tensor of all
    the groups: the weight's file pages are released chunk by chunk (`row_chunks`), and no unpacked copy of the
    whole matrix ever exists beside the packed one."""
    rows = max(1, (1 << 24) // weight.shape[1] // group_rows) * group_rows
    packed = None
    for start, chunk in row_chunks(weight, rows):
        part = pack_chunk(chunk)
        if packed is None:
            packed = part.new_empty(-(-weight.shape[0] // group_rows), *part.shape[1:])
        packed[start // group_rows : start // group_rows + len(part)] = part
    return packed


def pack_for_cpu(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The bfloat16 CPU `weight` in oneDNN's blocked layout, or None where this torch build or processor cannot."""
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16 or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


# PackedLinear's oneDNN weights by key. torch.compile cannot take such opaque tensors as graph inputs, so compiled
# code calls `packed_linear` with the key instead, and the weight stays where it is: one copy, shared by every
# compiled graph.
_PACKED_WEIGHTS: dict[int, torch.Tensor] = {}
_packed_keys = itertools.count()


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, None, "none", [], "")


@torch.library.custom_op("llama::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    """x @ weight.T for the oneDNN-packed weight registered under `key` by a `PackedLinear`."""
    return _onednn_linear(x, _PACKED_WEIGHTS[key])


@packed_linear.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


class PackedLinear(nn.Module):
    """x @ weight.T on the CPU, computed from a copy of the weight in oneDNN's layout (see `pack_for_cpu`).

    Only the packed copy is kept: `weight` is a shape-only (meta) parameter that records the layer's size and dtype.
    """

    def __init__(self, weight: torch.Tensor, packed: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        self.packed = packed  # oneDNN's opaque tensor: not a parameter or buffer, which need a plain storage
        self.key = next(_packed_keys)
        _PACKED_WEIGHTS[self.key] = packed
        weakref.finalize(self, _PACKED_WEIGHTS.pop, self.key, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.key, self.weight.shape[0])
        # Eagerly, oneDNN directly: a custom op's dispatch would cost more than the matmul of a decode step's row.
        return _onednn_linear(x, self.packed)


class Bf16Linear(nn.Module):
    """x @ weight.T for a bfloat16 CPU weight, by `llama.bf16_cpu`'s kernel on the weight in its packed layout, for
    any number of rows (decode steps and prompts alike).

    Only the packed copy is kept: `weight` is a shape-only (meta) parameter that records the layer's size and dtype.
    With `widen_output` the results come in float32, holding the same bfloat16 values (see `bf16_cpu.linear`).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        self.register_buffer("packed", _pack_in_chunks(weight, bf16_cpu.GROUP_ROWS, bf16_cpu.pack), persistent=False)
        self.widen_output = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return bf16_cpu.bf16_linear(x, self.packed, self.weight.shape[0], self.widen_output)
        # No operator dispatch: it costs a small layer.
        return bf16_cpu.linear(x, self.packed, self.weight.shape[0], self.widen_output)


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


def check_quantize(quantize: Optional[str]) -> None:
    """Raise ValueError unless `quantize` is None or one of QUANTIZATIONS."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        choices = " or ".join(f'"{name}"' for name in QUANTIZATIONS)
        raise ValueError(f"quantize must be None or {choices}, got {quantize!r}")


def linear_kernel(weight: torch.Tensor, quantize: Optional[str] = None) -> nn.Module:
    """The layer that computes x @ weight.T for a loaded `weight` (out_features, in_features).

    `quantize="int8"` gives an `Int8Linear`, `"int4"` an `Int4Linear` (None: no quantization); otherwise a
    bfloat16 CPU weight gives a `Bf16Linear` where `llama.bf16_cpu`'s kernel runs, else a `PackedLinear` where
    oneDNN can pack it, and anything else a plain bias-free `nn.Linear` holding `weight` itself.
    """
    check_quantize(quantize)
    if quantize == "int8":
        return Int8Linear(weight)
    if quantize == "int4":
        return Int4Linear(weight)
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and bf16_cpu.available():
        return Bf16Linear(weight)
    packed = pack_for_cpu(weight)
    if packed is not None:
        return PackedLinear(weight, packed)
    return plain_linear(weight)


def plain_linear(weight: torch.Tensor) -> nn.Linear:
    """A bias-free `nn.Linear` holding `weight` itself (no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    return linear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights `model`'s layers keep: parameters and buffers, where a shape-only (meta) weight counts
    only for a `PackedLinear`, whose oneDNN copy of the same size is neither."""
    total = 0
    for module in model.modules():
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if not tensor.is_meta or isinstance(module, PackedLinear):
                total += tensor.numel() * tensor.element_size()
    return total


def block_linear(blocks: Blocks, dtype: torch.dtype) -> nn.Module:
    """The layer that computes x @ weight.T for a weight stored as `blocks`, without requantizing them, for
    activations of `dtype`: an `Int4Linear` for `Q4Blocks`, a `Q8BlockLinear` for `Q8Blocks`."""
    layer = Int4Linear if isinstance(blocks, Q4Blocks) else Q8BlockLinear
    return layer.from_blocks(blocks, dtype)


class ConcatLinear(nn.Module):
    """x @ weight.T for a weight whose rows are held, in order, by separate layers: their outputs side by side
    (a stacked wq/wk/wv whose parts a GGUF file stores in different forms, e.g. Q4_K and Q6_K)."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class BlockEmbedding(nn.Module):
    """The embedding rows [start, start + rows) of the vocabulary, looked up in a block layer's weight (its
    `rows`), so that a tied output layer and the embedding share one copy; other tokens look up zeros (another
    process holds them, as in `llama.parallel.VocabParallelEmbedding`)."""

    def __init__(self, layer: nn.Module, start: int, rows: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer, self.start, self.n_rows, self.dtype = layer, start, rows, dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        held = (local >= 0) & (local < self.n_rows)
        found = self.layer.rows(local.clamp(0, self.n_rows - 1).reshape(-1), self.dtype).view(*tokens.shape, -1)
        return found * held.unsqueeze(-1).to(found.dtype)
