"""bfloat16 matrix products with few rows (decoding) on x86 CPUs with AVX-512 BF16.

A decode step multiplies each weight once by a few rows of activations, so it runs at the speed the weights are
read from memory. oneDNN's kernel (on its packed layout) read them at about 72 % of the machine's bandwidth where
llama.cpp's reads at about 93 %; this module's kernel, `csrc/bf16_cpu.cpp` (compiled on first use by
`llama.cpu_extension`), streams several rows of the weight at once through the processor's bfloat16 dot-product
instruction (VDPBF16PS). It reads the weight in its own row-major layout, so the same tensor serves torch's matmul
for prompts. Where the processor lacks AVX-512 BF16, or the kernel cannot be built, `available()` is False.
"""

import ctypes
import functools
from pathlib import Path
from typing import Optional

import torch

from llama import cpu_extension

SOURCE = Path(__file__).with_name("csrc") / "bf16_cpu.cpp"


def _processor_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (with a warning if building it failed) where it cannot run."""
    if not _processor_has_bf16():
        return None
    arguments = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return cpu_extension.load_library("llama_bf16_cpu", SOURCE, {"llama_bf16_linear": arguments},
                                      "bfloat16 on the CPU", "using oneDNN's bfloat16 kernel, which decodes slower")


def available() -> bool:
    """Whether this process can use the kernel: Linux on x86-64 with AVX-512 BF16 (and VNNI), and it compiled."""
    return _library() is not None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for a CPU bfloat16 `x` (..., in_features) and a contiguous bfloat16 `weight` (out_features,
    in_features), summed in float32 and rounded to bfloat16 once."""
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16 or not weight.is_contiguous():
        raise ValueError(f"bf16_cpu.linear takes bfloat16 x and a contiguous bfloat16 weight, got {x.dtype} and "
                         f"{'a contiguous' if weight.is_contiguous() else 'a non-contiguous'} {weight.dtype}")
    if x.shape[-1] != weight.shape[1]:  # the kernel would read past (or short of) the rows it is given
        raise ValueError(f"x has {x.shape[-1]} features but the weight takes {weight.shape[1]}")
    rows = x.numel() // x.shape[-1]
    x2d = x.reshape(rows, x.shape[-1]).contiguous()
    out = torch.empty(rows, weight.shape[0], dtype=torch.bfloat16)
    _library().llama_bf16_linear(x2d.data_ptr(), rows, x2d.shape[1], weight.data_ptr(), weight.shape[0],
                                 out.data_ptr())
    return out.view(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("llama::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear` as an operator that `torch.compile`d code can call."""
    return linear(x, weight)


@bf16_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
