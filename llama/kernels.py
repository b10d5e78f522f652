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
are stored in different forms, and `BlockEmbedding` looks the embedding's rows up in such a layer. The rest of a
bfloat16 model's CPU kernels (norms, attention, whole blocks' decode steps) are `llama.cpu_decode`'s.
"""

import itertools
import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from llama import bf16_cpu, int8_cpu
from llama.block_quant import Blocks, Q4Blocks
from llama.file_pages import row_chunks
from llama.int4 import Int4Linear, Q8BlockLinear

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
