"""Linear layers with weights in GGUF's blocks of 32 (`llama.block_quant`): 4-bit `Int4Linear` (`quantize="int4"`)
and 8-bit `Q8BlockLinear` (a GGUF file's Q8_0 tensors).

`Int4Linear` quantizes a float weight to `Q4Blocks`: every row is cut into blocks of 32 input values, each with a
float16 scale and minimum (asymmetric: w ≈ scale * q + min, q in 0..15, the block's minimum at q = 0 and maximum at
15), or takes stored blocks as they are (`from_blocks`). Both layers compute:
- on x86 CPUs with AVX-512 VNNI, with `llama.blocks_cpu`'s kernel (activations quantized to int8 per block of 32),
  keeping only its packed copy of the blocks;
- elsewhere, `Int4Linear` with torch's int4 kernels: on the CPU `torch.ops.aten._weight_int4pack_mm_for_cpu`
  (vectorized for bfloat16 activations only), on CUDA `_weight_int4pack_mm` (tinygemm: bfloat16, compute
  capability 8.0 or later), each on its own packing of q, with w = (q - 8) * scale + zero where zero = min + 8 *
  scale in the activation dtype; and `Q8BlockLinear` with its weight dequantized to the model's dtype.
Both read rows of their weight back, dequantized (`rows`), so that a tied embedding can share the output layer's
memory.
"""

import dataclasses
import functools
from typing import Iterator, Optional

import torch
from torch import nn

from llama import blocks_cpu
from llama.block_quant import BLOCK, Blocks, Q4Blocks, Q8Blocks, dequantize, has_q4_0_mins, pack_q4, unpack_q4
from llama.file_pages import row_chunks

GROUP_SIZE = BLOCK  # input values that share a scale and a minimum (README's "int4" section says why 32)
ROW_BLOCK = 64  # rows quantized and packed at a time, and torch's packings' rows padded to a multiple of it
QUANTIZE_CHUNK_BYTES = 1 << 22  # float32 temporaries of ~16 MB at a time, not of the whole matrix


def _round_half(x: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 `x` as float16, rounded towards +inf (`up`) or -inf rather than to the nearest."""
    half = x.half()
    off = half.float() < x if up else half.float() > x
    return torch.where(off, torch.nextafter(half, torch.full_like(half, float("inf") if up else -float("inf"))),
                       half)


def quantize_q4(weight: torch.Tensor) -> Q4Blocks:
    """`weight` (rows, in_features) as Q4 blocks: w ≈ scale * q + min within scale / 2 for every value.

    The minimum is rounded down to float16 and the scale, (maximum - minimum) / 15, up, so that the block's range
    stays within q = 0..15; q is rounded from the float16 scale and minimum, what the kernels compute with.
    """
    blocks = weight.float().unflatten(1, (-1, BLOCK))
    low = _round_half(blocks.amin(-1), up=False)
    # A constant block has no range; any positive scale keeps it exact (q = 0 is its minimum).
    span = (blocks.amax(-1) - low.float()).clamp(min=2.0 ** -24)
    scale = _round_half(span / 15, up=True)
    steps = (blocks - low.float()[..., None]) / scale.float()[..., None]
    q = steps.round_().clamp_(0, 15).to(torch.uint8).flatten(1)
    return Q4Blocks(pack_q4(q), scale, low)


def check_kernel(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless there is an int4 kernel for `device` and activations of `dtype`."""
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise ValueError(f'quantize="int4" runs on the CPU and on CUDA GPUs (torch has no int4 kernel for '
                         f"{device.type}); use quantize=None or \"int8\" there")
    if dtype != torch.bfloat16:
        raise ValueError(f'quantize="int4" on CUDA computes in bfloat16 (torch\'s int4 kernel), not {dtype}; '
                         'pass dtype="bfloat16"')
    if torch.version.hip is None and torch.cuda.get_device_capability(device) < (8, 0):
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(f'quantize="int4" on CUDA needs compute capability 8.0 or later (torch\'s int4 kernel); '
                         f"{device} has {major}.{minor}: use quantize=None or \"int8\"")


def _torch_pack(q: torch.Tensor) -> torch.Tensor:
    """q (rows, in_features) in 0..15 in the layout of torch's int4 kernel for its device."""
    if q.device.type == "cuda":
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # the kernel's input: even columns in the high nibble
        inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)  # the widest loads that fit
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)  # no tiles to choose


@functools.cache
def _torch_positions(in_features: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Where `_torch_pack` puts each value of ROW_BLOCK rows: (byte, nibble shift), each (ROW_BLOCK, in_features).

    Found by packing ROW_BLOCK rows whose values are, four bits at a time, the digits of their own index, so that
    `rows` follows torch's layout (which varies with the device and the CPU's vector width) without copying it.
    """
    index = torch.arange(ROW_BLOCK * in_features, device=device)
    digits = range(0, max(1, index[-1].item()).bit_length(), 4)
    packed = [_torch_pack((index >> d & 15).view(ROW_BLOCK, in_features)).view(torch.uint8).flatten() for d in digits]
    byte = torch.empty_like(index)
    shift = torch.empty_like(index)
    for nibble in (0, 4):
        found = sum(((p >> nibble & 15).long() << d) for p, d in zip(packed, digits))
        byte[found] = torch.arange(len(found), device=device)
        shift[found] = nibble
    return byte.view(ROW_BLOCK, in_features), shift.view(ROW_BLOCK, in_features)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _q4_chunks(weight: torch.Tensor) -> Iterator[Q4Blocks]:
    """`weight` quantized ROW_BLOCK rows or a few MB at a time."""
    chunk = max(1, QUANTIZE_CHUNK_BYTES // (4 * weight.shape[1]) // ROW_BLOCK) * ROW_BLOCK
    for _, rows in row_chunks(weight, chunk):  # a mapped weight's file pages go chunk by chunk
        yield quantize_q4(rows)


def _checked(weight: torch.Tensor) -> torch.Tensor:
    if weight.shape[1] % GROUP_SIZE:
        raise ValueError(f'quantize="int4" needs in-features that are a multiple of its group size {GROUP_SIZE} '
                         f"(GGUF's blocks), got a weight of {weight.shape[1]}")
    return weight


def _check_blocks(blocks: Blocks) -> None:
    """Raise ValueError unless `blocks` holds values and float16 scales (and mins) of one weight's shape."""
    rows, cols = blocks.shape
    kind = "Q4" if isinstance(blocks, Q4Blocks) else "Q8"
    values = (torch.uint8, (rows, cols // 2)) if kind == "Q4" else (torch.int8, (rows, cols))
    fields = {"values": values, "scales": (torch.float16, (rows, cols // BLOCK))}
    if kind == "Q4":
        fields["mins"] = fields["scales"]
    for name, (dtype, shape) in fields.items():
        tensor = getattr(blocks, name)
        if cols % BLOCK or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{kind} blocks' {name} must be {dtype} of shape {shape} for a weight of in-features "
                             f"a multiple of {BLOCK}, got {tensor.dtype} of shape {tuple(tensor.shape)}")


def _row_slices(blocks: Blocks) -> Iterator[Blocks]:
    """Stored blocks ROW_BLOCK * 64 rows at a time, so that packing makes small temporaries; a memory-mapped
    checkpoint's pages are let go slice by slice (`row_chunks`), so that they are not held beside the packed copy."""
    fields = [getattr(blocks, field.name) for field in dataclasses.fields(blocks)]
    for parts in zip(*(row_chunks(field, ROW_BLOCK * 64) for field in fields)):
        # contiguous: stored blocks may be strided views, say of a GGUF file's interleaved scales and values
        yield type(blocks)(*(part.contiguous() for _, part in parts))


def _concatenate(parts: Iterator[tuple[int, torch.Tensor]], rows: int) -> torch.Tensor:
    """Packed parts, each with the (padded) rows it holds, as one tensor of `rows` rows, allocated at the first
    part: no second copy of the whole is made. All parts but the last hold a multiple of ROW_BLOCK rows."""
    out, start = None, 0
    for part_rows, part in parts:
        if out is None:  # entries per row: 1 / 64 for blocks_cpu, 1 for torch's CPU packing, 1 / 8 for CUDA's
            out = part.new_empty(rows * part.shape[0] // part_rows, *part.shape[1:])
        out[start:start + len(part)] = part
        start += len(part)
    return out


def _kernel_packed(chunks: Iterator[Blocks], rows: int, without_mins: bool = False) -> torch.Tensor:
    """`blocks_cpu.pack` of each chunk of blocks in turn, as one tensor of `rows` rows (padded to 64)."""
    parts = ((_round_up(len(chunk.values), 64), blocks_cpu.pack(chunk, without_mins)) for chunk in chunks)
    return _concatenate(parts, _round_up(rows, 64))


def _torch_parts(chunks: Iterator[Q4Blocks], scales_and_zeros: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """Chunks of blocks in torch's int4 layout (rows padded to ROW_BLOCK), their scales and zero points written
    into `scales_and_zeros` (in_features / 32, rows, 2) as they go."""
    start = 0
    for chunk in chunks:
        scale = chunk.scales.float()
        zero = chunk.mins.float() + 8 * scale  # (q - 8) * scale + zero = scale * q + min
        scales_and_zeros[:, start:start + len(scale)] = torch.stack([scale.T, zero.T], dim=-1)
        q = unpack_q4(chunk.values)
        q = torch.cat([q, q.new_zeros(-len(q) % ROW_BLOCK, q.shape[1])])  # padded rows keep zero scales
        yield len(q), _torch_pack(q)
        start += len(scale)


class Int4Linear(nn.Module):
    """x @ weight.T with the weight (out_features, in_features) in Q4 blocks of 32 input values (see the module's
    docstring); `weight` itself is a shape-only meta parameter. Built from a float weight, which it quantizes
    (`quantize_q4`), or from stored blocks (`from_blocks`).

    Raises ValueError if in_features is not a multiple of 32.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        dtype = torch.bfloat16 if weight.device.type == "cuda" else weight.dtype  # what torch's kernels take
        self._build(weight.shape, dtype, weight.device, _q4_chunks(_checked(weight)), without_mins=False)

    @classmethod
    def from_blocks(cls, blocks: Q4Blocks, dtype: torch.dtype = torch.bfloat16) -> "Int4Linear":
        """The layer of stored `blocks` (on the device they are on), as they are; `dtype` is the activations' (the
        model's) dtype, which torch's kernels keep scales and zero points in where this package's kernel is not
        available. Raises ValueError if the blocks' tensors do not fit together."""
        _check_blocks(blocks)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        # GGUF's Q4_0 blocks (minimum -8 × scale) need no minimums in the kernel's layout: a tenth fewer bytes.
        layer._build(torch.Size(blocks.shape), dtype, blocks.values.device, _row_slices(blocks),
                     without_mins=has_q4_0_mins(blocks))
        return layer

    def _build(self, shape: torch.Size, dtype: torch.dtype, device: torch.device, chunks: Iterator[Q4Blocks],
               without_mins: bool) -> None:
        rows, cols = shape
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
        # Derived from the weights, not checkpoint tensors: kept out of the state dict, as int8's scales are.
        self.register_buffer("scales_and_zeros", None, persistent=False)  # for torch's kernels only
        if device.type == "cpu" and blocks_cpu.available():
            self.register_buffer("packed", _kernel_packed(chunks, rows, without_mins), persistent=False)
            return
        padded = _round_up(rows, ROW_BLOCK)
        self.scales_and_zeros = torch.zeros(cols // BLOCK, padded, 2, dtype=dtype, device=device)  # the kernels'
        self.register_buffer("packed", _concatenate(_torch_parts(chunks, self.scales_and_zeros), padded),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_features, in_features = self.weight.shape
        if self.scales_and_zeros is None:
            if torch.compiler.is_compiling():
                return blocks_cpu.blocks_linear(x, self.packed, out_features)
            return blocks_cpu.linear(x, self.packed, out_features)  # no operator dispatch
        x2d = x.reshape(-1, in_features).to(self.scales_and_zeros.dtype).contiguous()
        if x.device.type == "cuda":
            out = torch.ops.aten._weight_int4pack_mm(x2d, self.packed, GROUP_SIZE, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, GROUP_SIZE, self.scales_and_zeros)
        if out.shape[1] != out_features:  # padded rows
            out = out[:, :out_features]
        return out.to(x.dtype).reshape(*x.shape[:-1], out_features)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized in float32 and cast to `dtype`: (*ids.shape, in_features)."""
        if self.scales_and_zeros is None:
            return blocks_cpu.rows(self.packed, ids, dtype)
        cols = self.weight.shape[1]
        byte, shift = _torch_positions(cols, self.packed.device)
        flat = ids.reshape(-1)
        chunks = self.packed.view(torch.uint8).view(-1, byte.numel() // 2)[flat // ROW_BLOCK]  # each id's 64 rows
        within = flat % ROW_BLOCK
        q = (chunks.gather(1, byte[within]) >> shift[within] & 15).float().unflatten(1, (-1, BLOCK))
        scale, zero = self.scales_and_zeros[:, flat].float().permute(2, 1, 0)  # (ids, blocks) each
        w = (q - 8) * scale[..., None] + zero[..., None]
        return w.flatten(1).to(dtype).view(*ids.shape, cols)


class Q8BlockLinear(nn.Module):
    """x @ weight.T with the weight (out_features, in_features) in Q8 blocks of 32 input values (GGUF's Q8_0), built
    from stored blocks (`from_blocks`). On a CPU with `llama.blocks_cpu`'s kernel only its packed copy is kept
    (`weight` is then a shape-only meta parameter); elsewhere the weight is dequantized to the model's dtype once,
    at load, and multiplied as a plain float weight (twice int8's memory in bfloat16)."""

    def __init__(self, weight: torch.Tensor, packed: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.register_buffer("packed", packed, persistent=False)  # derived from the blocks: not a checkpoint tensor

    @classmethod
    def from_blocks(cls, blocks: Q8Blocks, dtype: torch.dtype = torch.bfloat16) -> "Q8BlockLinear":
        """The layer of stored `blocks` (on the device they are on); `dtype` is the activations' (the model's).
        Raises ValueError if the blocks' tensors do not fit together."""
        _check_blocks(blocks)
        if blocks.values.device.type == "cpu" and blocks_cpu.available():
            packed = _kernel_packed(_row_slices(blocks), blocks.shape[0])
            return cls(torch.empty(blocks.shape, dtype=dtype, device="meta"), packed)
        return cls(dequantize(Q8Blocks(blocks.values.contiguous(), blocks.scales.contiguous()), dtype), None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return nn.functional.linear(x, self.weight)
        if torch.compiler.is_compiling():
            return blocks_cpu.blocks_linear(x, self.packed, self.weight.shape[0])
        return blocks_cpu.linear(x, self.packed, self.weight.shape[0])

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight, dequantized in float32 and cast to `dtype`: (*ids.shape, in_features)."""
        if self.packed is None:
            return self.weight[ids].to(dtype)
        return blocks_cpu.rows(self.packed, ids, dtype)
