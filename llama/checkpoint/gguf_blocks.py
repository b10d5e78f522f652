"""GGUF weights in the block forms of `llama.block_quant`, read from their raw bytes, for `from_gguf`.

- Q8_0, Q4_0 and Q4_1 blocks are copied as they are: Q8_0 is `Q8Blocks`, Q4_1 `Q4Blocks`, Q4_0 `Q4Blocks` with
  min = -8 * d (exact in float16).
- Q4_K (super-blocks of 256 values: 8 sub-blocks of 32 with 6-bit scales and mins under float16 d and dmin, what
  Q4_K_M files mostly hold) becomes `Q4Blocks` with scale d * sc and min -dmin * m per 32 values, rounded to float16.
- Q5_0, Q5_1, Q5_K and Q6_K are dequantized by the gguf package and requantized to `Q8Blocks` (8 bits per value
  and a float16 scale per 32: finer than their 5 or 6 bits, though not exactly the same values).
- Floating-point tensors stay floating point; any other type is dequantized, as without blocks.

Conversions are measured against the gguf package's own dequantization (an independent implementation), and
`ImportReport` says, one line per source type, what became of its tensors and at what relative RMS error.
"""

import dataclasses
import math
from typing import Any, Union

import torch

from llama.block_quant import BLOCK, Blocks, Q4Blocks, Q8Blocks, dequantize, pack_q4

KEPT = {"Q4_0": "4-bit", "Q4_1": "4-bit", "Q8_0": "8-bit"}
TO_Q4 = {"Q4_K"}
TO_Q8 = {"Q5_0", "Q5_1", "Q5_K", "Q6_K"}
FLOATS = {"F32", "F16", "BF16", "F64"}
BLOCK_TYPES = set(KEPT) | TO_Q4 | TO_Q8  # the types stored as blocks
CHUNK_VALUES = 1 << 22  # values converted at a time: float32 temporaries of ~16 MB


@dataclasses.dataclass
class TypeCount:
    """The tensors of one GGUF type: how many, and the squared error of their conversion and of gguf's values."""

    tensors: int = 0
    squared_error: float = 0.0
    squared_values: float = 0.0


@dataclasses.dataclass
class ImportReport:
    """What `read_weight` did with each GGUF tensor type, in `dtype` where it kept floating point."""

    dtype: torch.dtype
    types: dict[str, TypeCount] = dataclasses.field(default_factory=dict)

    def add(self, kind: str, error: float = 0.0, values: float = 0.0) -> None:
        """Count one tensor of GGUF type `kind`, with the squared error of its conversion and its squared values."""
        count = self.types.setdefault(kind, TypeCount())
        count.tensors, count.squared_error, count.squared_values = (
            count.tensors + 1, count.squared_error + error, count.squared_values + values)

    def lines(self) -> list[str]:
        """One line per GGUF type: what its tensors became (and the relative RMS error of a conversion)."""
        dtype = str(self.dtype).removeprefix("torch.")
        lines = []
        for kind, count in sorted(self.types.items()):
            error = math.sqrt(count.squared_error / count.squared_values) if count.squared_values else 0.0
            measured = f": relative RMS error {error:.2e} against gguf's dequantization"
            what = (f"kept as they are ({KEPT[kind]} blocks)" if kind in KEPT
                    else "converted to 4-bit blocks (scale and minimum per 32 values in float16)" + measured
                    if kind in TO_Q4 else "requantized to 8-bit blocks (Q8_0)" + measured if kind in TO_Q8
                    else f"kept in floating point as {dtype}" if kind in FLOATS
                    else f"dequantized to {dtype} (no block form here keeps this type)")
            lines.append(f"{kind}: {count.tensors} tensor(s) {what}")
        return lines


def _raw_blocks(data: Any, block_bytes: int) -> torch.Tensor:
    """Raw GGUF blocks (a numpy array of rows of bytes) as uint8 (rows, blocks per row, block_bytes)."""
    import numpy as np

    return torch.from_numpy(np.array(data, dtype=np.uint8)).view(len(data), -1, block_bytes)


def _half(raw: torch.Tensor, at: int) -> torch.Tensor:
    """The float16 at byte `at` of every block: (rows, blocks)."""
    return raw[..., at:at + 2].contiguous().view(torch.float16).squeeze(-1)


def _q4_k(raw: torch.Tensor) -> Q4Blocks:
    """Q4_K super-blocks (rows, n, 144 bytes: d, dmin, 12 bytes of 6-bit scales and mins, 128 of values) as blocks
    of 32 with scale d * sc and min -dmin * m."""
    rows, n = raw.shape[:2]
    d, dmin, packed, values = _half(raw, 0).float(), _half(raw, 2).float(), raw[..., 4:16], raw[..., 16:]
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    # Sub-blocks 0-3 keep 6 bits in bytes 0-3 (scales) and 4-7 (mins); 4-7 take 4 bits from bytes 8-11 and their
    # top 2 bits from the top bits of bytes 0-3 (scales) and 4-7 (mins).
    sc = torch.cat([low & 63, (high & 0xF) | (low >> 6) << 4], dim=-1).float()  # (rows, n, 8)
    m = torch.cat([mid & 63, (high >> 4) | (mid >> 6) << 4], dim=-1).float()
    # Each 32 bytes of values hold two sub-blocks: values 0..31 of the first in the low nibbles, of the next in the
    # high ones.
    chunks = values.reshape(rows, n, 4, 1, 32)
    q = torch.cat([chunks & 0xF, chunks >> 4], dim=3).reshape(rows, -1)
    return Q4Blocks(pack_q4(q), (d[..., None] * sc).to(torch.float16).reshape(rows, -1),
                    (-dmin[..., None] * m).to(torch.float16).reshape(rows, -1))


def _kept(kind: str, raw: torch.Tensor) -> Blocks:
    """Q8_0 (d, 32 int8), Q4_0 (d, 16 bytes) or Q4_1 (d, m, 16 bytes) blocks as they are."""
    rows = raw.shape[0]
    if kind == "Q8_0":
        return Q8Blocks(raw[..., 2:].reshape(rows, -1).view(torch.int8), _half(raw, 0))
    d = _half(raw, 0)
    if kind == "Q4_0":
        return Q4Blocks(raw[..., 2:].reshape(rows, -1), d, (d.float() * -8).to(torch.float16))
    return Q4Blocks(raw[..., 4:].reshape(rows, -1), d, _half(raw, 2))


def quantize_q8(weight: torch.Tensor) -> Q8Blocks:
    """`weight` (rows, in_features) as Q8_0 blocks: per 32 values, scale = max |w| / 127 in float16 and q =
    round(w / scale), as llama.cpp quantizes to Q8_0 (q computed from the float16 scale)."""
    groups = weight.float().unflatten(1, (-1, BLOCK))
    scales = (groups.abs().amax(-1) / 127).to(torch.float16)
    divisor = scales.float().masked_fill(scales == 0, 1)[..., None]  # an all-zero block stays zero
    values = (groups / divisor).round_().clamp_(-127, 127).to(torch.int8)
    return Q8Blocks(values.flatten(1), scales)


def _gguf_values(data: Any, kind: Any) -> torch.Tensor:
    """Rows `data` (a numpy array) of a tensor of GGUF type `kind`, as the gguf package dequantizes them: float32
    (rows, columns)."""
    import numpy as np
    from gguf.quants import dequantize as gguf_dequantize

    return torch.from_numpy(np.array(gguf_dequantize(data, kind), dtype=np.float32)).view(len(data), -1)


def _joined(parts: list) -> Union[Blocks, torch.Tensor]:
    """Row chunks (blocks or tensors) as one."""
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    fields = [field.name for field in dataclasses.fields(parts[0])]
    return type(parts[0])(*(torch.cat([getattr(part, field) for part in parts]) for field in fields))


def read_weight(tensor: Any, dtype: torch.dtype, report: ImportReport) -> Union[Blocks, torch.Tensor]:
    """The 2-D GGUF tensor `tensor` (a gguf ReaderTensor) as blocks (see the module's docstring), or else as a
    (rows, columns) tensor of `dtype`; counted (and any conversion measured) in `report`. Converted a few MB of
    float32 at a time, not the whole matrix."""
    from gguf import GGML_QUANT_SIZES

    kind, block_bytes = tensor.tensor_type.name, GGML_QUANT_SIZES[tensor.tensor_type][1]
    if kind in KEPT:
        report.add(kind)
        return _kept(kind, _raw_blocks(tensor.data, block_bytes))
    rows, columns = math.prod(int(n) for n in tensor.shape[1:]), int(tensor.shape[0])
    step = max(1, CHUNK_VALUES // columns)
    parts, squared_error, squared_values = [], 0.0, 0.0
    for start in range(0, rows, step):
        data = tensor.data[start:start + step]
        reference = _gguf_values(data, tensor.tensor_type)
        if kind not in TO_Q4 | TO_Q8:
            parts.append(reference.to(dtype))
            continue
        blocks = _q4_k(_raw_blocks(data, block_bytes)) if kind in TO_Q4 else quantize_q8(reference)
        squared_error += (dequantize(blocks) - reference).square().sum(dtype=torch.float64).item()
        squared_values += reference.square().sum(dtype=torch.float64).item()
        parts.append(blocks)
    report.add(kind, squared_error, squared_values)
    return _joined(parts)
