"""Weights quantized in blocks of 32 input values, as llama.cpp's GGUF files hold them (Q4_0, Q4_1, Q8_0).

These are the logical forms that checkpoints store and that layers are built from; each kernel repacks them into
a layout of its own when a layer is built. Rows are output channels; every row is cut into blocks of BLOCK input
values, each with its own float16 scale (and, for 4 bits, float16 minimum):

- `Q4Blocks`: w = scale * q + min, q in 0..15. Within a block's 16 bytes, byte i holds value i in its low nibble
  and value i + 16 in its high nibble (GGUF's order), so a GGUF Q4_1 block is copied as it is, and a Q4_0 block
  (w = d * (q - 8)) is the same with min = -8 * d.
- `Q8Blocks`: w = scale * q, q int8 (GGUF's Q8_0).
"""

from dataclasses import dataclass
from typing import Union

import torch

BLOCK = 32  # input values that share a scale (and a minimum)


@dataclass
class Q4Blocks:
    """4-bit values (rows, in_features / 2) uint8, scales and mins (rows, in_features / BLOCK) float16."""

    values: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's (out_features, in_features)."""
        return self.values.shape[0], self.values.shape[1] * 2


@dataclass
class Q8Blocks:
    """int8 values (rows, in_features), scales (rows, in_features / BLOCK) float16."""

    values: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        """The weight's (out_features, in_features)."""
        return self.values.shape[0], self.values.shape[1]


Blocks = Union[Q4Blocks, Q8Blocks]


def has_q4_0_mins(blocks: Q4Blocks) -> bool:
    """Whether every block's minimum is -8 × its scale, as GGUF's Q4_0 blocks (w = scale × (q - 8)) are stored."""
    return bool((blocks.mins == blocks.scales * -8).all())  # exact in float16 (a power of two), without copies


def unpack_q4(values: torch.Tensor) -> torch.Tensor:
    """The 4-bit values (rows, in_features / 2) of `Q4Blocks` as uint8 (rows, in_features) in column order."""
    rows = values.shape[0]
    pairs = values.view(rows, -1, BLOCK // 2)  # (rows, blocks, 16)
    return torch.cat([pairs & 0x0F, pairs >> 4], dim=-1).view(rows, -1)  # low nibbles are values 0..15 of a block


def pack_q4(q: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_q4`: q (rows, in_features) in 0..15 -> (rows, in_features / 2) uint8."""
    blocks = q.to(torch.uint8).view(q.shape[0], -1, BLOCK)
    return (blocks[..., :BLOCK // 2] | blocks[..., BLOCK // 2:] << 4).view(q.shape[0], -1)


def dequantize(blocks: Blocks, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight (out_features, in_features) that `blocks` stands for, computed in float32 and cast to `dtype`."""
    if isinstance(blocks, Q4Blocks):
        q = unpack_q4(blocks.values).float().unflatten(1, (-1, BLOCK))
        w = q * blocks.scales.float()[..., None] + blocks.mins.float()[..., None]
    else:
        w = blocks.values.float().unflatten(1, (-1, BLOCK)) * blocks.scales.float()[..., None]
    return w.flatten(1).to(dtype)
