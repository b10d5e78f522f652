"""int8 matrix products on x86 CPUs with AVX-512 VNNI, the integer dot-product instructions.

torch has no kernel that reads int8 weights at the memory's speed on such processors, so this module brings one:
`csrc/int8_cpu.cpp`, compiled on first use (`llama.cpu_extension`). Where it cannot be built, or the processor lacks
VNNI, `available()` is False and `llama.kernels` keeps torch's kernels.

The scheme is that of llama.cpp's Q8_0 for activations: each row of x is quantized 32 values at a time to int8
with one float scale per block, and multiplied by the int8 weight (one scale per output channel) in integers.
"""

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch

from llama import cpu_extension

GROUP_ROWS = 4 * 16  # weight rows the kernel reads as one stream: four registers of 16 int32 lanes
BLOCK = 32  # activation values that share one scale
SOURCE = Path(__file__).with_name("csrc") / "int8_cpu.cpp"


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (with a warning if building it failed) where it cannot run."""
    arguments = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                 ctypes.c_int64, ctypes.c_void_p]
    return cpu_extension.load_library(
        "llama_int8_cpu", SOURCE, {"llama_int8_linear_bf16": arguments, "llama_int8_linear_f32": arguments},
        "quantize='int8'", "using torch's int8 weight-only kernel, which decodes about half as fast")


def available() -> bool:
    """Whether this process can use the kernel: Linux on x86-64 with AVX-512 VNNI, and it compiled."""
    return _library() is not None


def pack(values: torch.Tensor) -> torch.Tensor:
    """int8 weight values (out_features, in_features) in the kernel's layout: (N / 64, K / 4, 64, 4) uint8, +128.

    Rows are padded with zeros to a multiple of 64 and columns to a multiple of 32.
    """
    rows, cols = values.shape
    shape = (_round_up(rows, GROUP_ROWS), _round_up(cols, BLOCK))
    if shape != (rows, cols):
        values = torch.nn.functional.pad(values, (0, shape[1] - cols, 0, shape[0] - rows))  # zeros
    groups = values.view(torch.uint8).view(shape[0] // GROUP_ROWS, GROUP_ROWS, shape[1] // 4, 4)
    packed = groups.permute(0, 2, 1, 3).contiguous()  # (groups, k / 4, rows of the group, 4): a copy
    return packed.bitwise_xor_(0x80)  # the kernel's instruction multiplies unsigned by signed bytes


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """x @ (values * scale[:, None]).T for `packed` values (see `pack`) and float32 `scale`, on a CPU `x`
    (..., in_features) of float32 or bfloat16 (other dtypes compute in float32); the activations are quantized
    per block of 32 values."""
    if x.dtype not in (torch.float32, torch.bfloat16):
        return linear(x.float(), packed, scale, out_features).to(x.dtype)
    rows = x.numel() // x.shape[-1]
    x2d = x.reshape(rows, x.shape[-1]).contiguous()
    out = torch.empty(rows, out_features, dtype=x.dtype)
    library = _library()
    kernel = library.llama_int8_linear_bf16 if x.dtype == torch.bfloat16 else library.llama_int8_linear_f32
    kernel(x2d.data_ptr(), rows, x2d.shape[1], packed.data_ptr(), scale.data_ptr(), out_features,
           packed.shape[1] * 4, out.data_ptr())
    return out.view(*x.shape[:-1], out_features)


class Weight(ctypes.Structure):
    """A layer's packed values, float32 scales and padded width (`pack`'s columns), as `linear_address`'s function
    takes its weight."""

    _fields_ = [("packed", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("padded_in_features", ctypes.c_int64)]


def linear_address() -> int:
    """The address of a C function computing `linear` for bfloat16 x as every linear kernel `bf16_cpu.DecodeLayer`
    calls: out (M, N) = x (M, K) @ W.T from (x, M, K, weight, N, out), `weight` the address of a `Weight`."""
    return ctypes.cast(_library().llama_int8_linear_bf16_of, ctypes.c_void_p).value


@torch.library.custom_op("llama::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """`linear` as an operator that `torch.compile`d code can call."""
    return linear(x, packed, scale, out_features)


@int8_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, out_features: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)
