"""Matrix products with weights in GGUF's blocks of 32 (`llama.block_quant`'s Q4 and Q8 blocks) on x86 CPUs with
AVX-512 VNNI: `csrc/blocks_cpu.cpp`, compiled on first use (`llama.cpu_extension`).

As in `llama.int8_cpu`, each row of activations is quantized to int8 per block of 32 values (one float scale per
block, llama.cpp's Q8_0 activations), and the products run on the processor's integer dot-product instruction. The
weights are repacked once, at load: each group of 64 rows becomes one stream of bytes that holds, block after block,
the values in the instruction's layout and then the block's float16 scales (and, for Q4, mins), so that a Q4 weight
costs 0.625 bytes read and a Q8 weight 1.0625. Q4 blocks whose every minimum is -8 × scale (GGUF's Q4_0) can be
packed without their minimums: 0.5625 bytes, as llama.cpp reads them. `rows` reads rows of a packed weight back,
dequantized (a tied embedding's lookup).
"""

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch

from llama import cpu_extension
from llama.block_quant import BLOCK, Blocks, Q4Blocks, Q8Blocks, has_q4_0_mins, unpack_q4

GROUP_ROWS = 64  # weight rows the kernel reads as one stream: four registers of 16 int32 lanes
FORMATS = ("q4", "q4_0", "q8")
SOURCE = Path(__file__).with_name("csrc") / "blocks_cpu.cpp"
_VALUE_BYTES = {"q4": 16 * GROUP_ROWS, "q4_0": 16 * GROUP_ROWS, "q8": BLOCK * GROUP_ROWS}  # then the scales
_HALVES = {"q4": 2, "q4_0": 1, "q8": 1}  # float16s a packed block holds per row: scale (and minimum)
_FORMAT_OF_BYTES = {_VALUE_BYTES[fmt] + 2 * _HALVES[fmt] * GROUP_ROWS: fmt for fmt in FORMATS}  # a block's bytes
_PACK_GROUPS = 64  # groups packed at a time: temporaries of a few MB, not of the whole matrix


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (with a warning if building it failed) where it cannot run."""
    arguments = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    names = [f"llama_{fmt}_linear_{dtype}" for fmt in FORMATS for dtype in ("bf16", "f32")]
    return cpu_extension.load_library("llama_blocks_cpu", SOURCE, dict.fromkeys(names, arguments), "quantize='int4'",
                                      "using torch's int4 kernels, and Q8 blocks dequantized to the model's dtype")


def available() -> bool:
    """Whether this process can use the kernel: Linux on x86-64 with AVX-512 VNNI, and it compiled."""
    return _library() is not None


def _groups(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """(rows, ...) padded with zero rows to `groups` * GROUP_ROWS."""
    padding = groups * GROUP_ROWS - rows.shape[0]
    return torch.cat([rows, rows.new_zeros(padding, *rows.shape[1:])]) if padding else rows


def _scales(halves: torch.Tensor, groups: int) -> torch.Tensor:
    """float16 (rows, blocks) -> (groups, blocks, 128) bytes: each block's 64 rows' values."""
    padded = _groups(halves, groups)
    return padded.view(groups, GROUP_ROWS, -1).transpose(1, 2).contiguous().view(torch.uint8)


def _pack_q4_part(blocks: Q4Blocks, groups: int, with_mins: bool) -> torch.Tensor:
    q = _groups(unpack_q4(blocks.values), groups)  # (rows, K) in 0..15
    # (group, register r, row i, block, step s, nibble h, byte t): k = 8 s + 4 h + t
    q = q.view(groups, 4, 16, -1, 4, 2, 4)
    nibbles = q[..., 0, :] | q[..., 1, :] << 4
    values = nibbles.permute(0, 3, 4, 1, 2, 5).reshape(groups, -1, _VALUE_BYTES["q4"])
    mins = [_scales(blocks.mins, groups)] if with_mins else []
    return torch.cat([values, _scales(blocks.scales, groups), *mins], dim=-1)


def _pack_q8_part(blocks: Q8Blocks, groups: int) -> torch.Tensor:
    q = _groups(blocks.values, groups).view(torch.uint8) ^ 0x80  # + 128: the instruction takes unsigned weights
    q = q.view(groups, 4, 16, -1, 8, 4)  # (group, register r, row i, block, step s, byte t): k = 4 s + t
    values = q.permute(0, 3, 4, 1, 2, 5).reshape(groups, -1, _VALUE_BYTES["q8"])
    return torch.cat([values, _scales(blocks.scales, groups)], dim=-1)


def pack(blocks: Blocks, without_mins: bool = False) -> torch.Tensor:
    """`blocks` in the kernel's layout: (ceil(rows / 64), in_features / 32, bytes of a block) uint8, rows padded
    with zeros (zero scales) to a multiple of 64. `without_mins` packs Q4 blocks whose minimums are all -8 × scale
    (`has_q4_0_mins`) without them."""
    rows = blocks.shape[0]
    if without_mins and not (isinstance(blocks, Q4Blocks) and has_q4_0_mins(blocks)):
        raise ValueError("without_mins takes Q4 blocks whose every minimum is -8 × scale (GGUF's Q4_0)")
    part = (functools.partial(_pack_q4_part, with_mins=not without_mins) if isinstance(blocks, Q4Blocks)
            else _pack_q8_part)
    fields = [blocks.values, blocks.scales] + ([blocks.mins] if isinstance(blocks, Q4Blocks) else [])
    chunks = []
    for start in range(0, rows, _PACK_GROUPS * GROUP_ROWS):
        # contiguous: stored blocks may be strided views, say of a GGUF file's interleaved scales and values
        piece = type(blocks)(*(field[start:start + _PACK_GROUPS * GROUP_ROWS].contiguous() for field in fields))
        chunks.append(part(piece, -(-piece.shape[0] // GROUP_ROWS)))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0]


def format_of(packed: torch.Tensor) -> str:
    """Which blocks `packed` (from `pack`) holds, one of FORMATS, told by the bytes of a block."""
    return _FORMAT_OF_BYTES[packed.shape[-1]]


def rows(packed: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` (any shape of int64) of the weight `packed` holds, dequantized in float32 and cast to `dtype`:
    (*ids.shape, in_features)."""
    fmt, flat = format_of(packed), ids.reshape(-1)
    group, register, row = flat // GROUP_ROWS, flat % GROUP_ROWS // 16, flat % 16
    blocks = packed[group]  # (n, blocks, bytes)
    steps = 8 if fmt == "q8" else 4
    values = blocks[..., :_VALUE_BYTES[fmt]].view(len(flat), -1, steps, 4, 16, 4)
    index = torch.arange(len(flat))
    values = values[index, :, :, register, row]  # (n, blocks, steps, 4)
    halves = blocks[..., _VALUE_BYTES[fmt]:].view(len(flat), packed.shape[1], -1, GROUP_ROWS, 2).view(torch.float16)
    halves = halves[index, :, :, flat % GROUP_ROWS, 0].float()  # (n, blocks, 1 or 2): scale (and min)
    if fmt != "q8":
        q = torch.stack([values & 0x0F, values >> 4], dim=-2).flatten(2).float()  # k = 8 s + 4 h + t
        w = q * halves[..., :1] + halves[..., 1:] if fmt == "q4" else (q - 8) * halves
    else:
        w = ((values ^ 0x80).view(torch.int8).flatten(2).float()) * halves
    return w.flatten(1).to(dtype).view(*ids.shape, -1)


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """x @ W.T for the weight W (out_features, in_features) that `packed` holds (see `pack`), on a CPU `x`
    (..., in_features) of float32 or bfloat16 (other dtypes compute in float32); the activations are quantized per
    block of 32 values. Raises ValueError if x's width is not the weight's."""
    in_features = packed.shape[1] * BLOCK
    if x.shape[-1] != in_features:  # the kernel would read past (or short of) the rows it is given
        raise ValueError(f"x has {x.shape[-1]} features but this layer takes {in_features}")
    if out_features > packed.shape[0] * GROUP_ROWS:
        raise ValueError(f"out_features {out_features} is more than the {packed.shape[0] * GROUP_ROWS} rows packed")
    if x.dtype not in (torch.float32, torch.bfloat16):
        return linear(x.float(), packed, out_features).to(x.dtype)
    count = x.numel() // in_features
    x2d = x.reshape(count, in_features).contiguous()
    out = torch.empty(count, out_features, dtype=x.dtype)
    name = f"llama_{format_of(packed)}_linear_{'bf16' if x.dtype == torch.bfloat16 else 'f32'}"
    getattr(_library(), name)(x2d.data_ptr(), count, in_features, packed.data_ptr(), out_features, out.data_ptr())
    return out.view(*x.shape[:-1], out_features)


def linear_address(packed: torch.Tensor) -> int:
    """The address of the C function `linear` calls for bfloat16 activations and the weight `packed`:
    out (M, N) = x (M, K) @ W.T from (x, M, K, packed, N, out), as `bf16_cpu.DecodeLayer` calls it."""
    return ctypes.cast(getattr(_library(), f"llama_{format_of(packed)}_linear_bf16"), ctypes.c_void_p).value


@torch.library.custom_op("llama::blocks_linear", mutates_args=())
def blocks_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """`linear` as an operator that `torch.compile`d code can call."""
    return linear(x, packed, out_features)


@blocks_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)
