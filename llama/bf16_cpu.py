"""bfloat16 decode steps on x86 CPUs with AVX-512 BF16: matrix products with few rows, attention, RMSNorm.

A decode step multiplies each weight once by a few rows of activations, so it runs at the speed the weights are
read from memory. oneDNN's kernel (on its packed layout) read them at about 72 % of the machine's bandwidth where
llama.cpp's reads at about 93 %; this module's kernel, `csrc/bf16_cpu.cpp` (compiled on first use by
`llama.cpu_extension`), reads each thread's rows of the weight as one sequential stream through the processor's
bfloat16 dot-product instruction (VDPBF16PS). It reads the weight in its row-major layout, so the same tensor
serves torch's matmul for prompts. The same source computes a decode step's attention and an RMSNorm in one call
each, in place of torch's many small operations. Where the processor lacks AVX-512 BF16, or the source cannot be
built, `available()` is False.
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
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "llama_bf16_linear": [pointer, size, size, pointer, size, pointer],
        "llama_bf16_decode_attention": [pointer, size, size, size, size, pointer, pointer, size, size, pointer,
                                        ctypes.c_float, pointer],
        "llama_bf16_rms_norm": [pointer, size, size, pointer, ctypes.c_float, pointer],
    }
    return cpu_extension.load_library("llama_bf16_cpu", SOURCE, signatures, "bfloat16 on the CPU",
                                      "using oneDNN's bfloat16 kernel, which decodes slower")


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


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     visible: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Attention of one new token per row, in one call: softmax(q k^T / sqrt(head_dim)) v per query head, each
    group of query heads sharing a kv head, computed in float32 and rounded to bfloat16 once.

    q: (rows, 1, n_heads, head_dim); keys, values: (rows, kv_len, n_kv_heads, head_dim), views of the KV cache (one
    stride between rows, the rest contiguous); visible: (rows, 1, 1, kv_len) bools, or None for every position.
    Returns (rows, 1, n_heads, head_dim), or None where the kernel does not apply (another device, dtype or layout,
    a head_dim that is not a multiple of 16), for the caller's own computation.
    """
    rows, _, n_heads, head_dim = q.shape
    kv_len, n_kv_heads = keys.shape[1], keys.shape[2]
    inner = (n_kv_heads * head_dim, head_dim, 1)
    if (q.device.type != "cpu" or q.dtype != torch.bfloat16 or keys.dtype != torch.bfloat16 or values.dtype != torch.bfloat16
            or head_dim % 16 or n_heads % n_kv_heads or keys.stride()[1:] != inner or values.stride() != keys.stride()
            or values.shape != keys.shape or q.shape[1] != 1 or keys.shape[0] != rows):
        return None
    q = q.contiguous()
    if visible is not None:
        visible = visible.reshape(rows, kv_len).contiguous()
    out = torch.empty_like(q)
    _library().llama_bf16_decode_attention(
        q.data_ptr(), rows, n_heads, n_kv_heads, head_dim, keys.data_ptr(), values.data_ptr(), keys.stride(0),
        kv_len, None if visible is None else visible.data_ptr(), head_dim**-0.5, out.data_ptr())
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> Optional[torch.Tensor]:
    """The model's RMSNorm of a bfloat16 CPU `x` (..., dim) in one call: x / rms(x) computed in float32 and rounded
    to bfloat16, times `weight` (dim,) rounded again, as `llama.model.RMSNorm` does in bfloat16. None where it does
    not apply (another device or dtype), for the caller's own computation."""
    if x.device.type != "cpu" or x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        return None
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for x of {dim} features")
    x = x.contiguous()
    out = torch.empty_like(x)
    _library().llama_bf16_rms_norm(x.data_ptr(), x.numel() // dim, dim, weight.contiguous().data_ptr(), eps,
                                   out.data_ptr())
    return out


@torch.library.custom_op("llama::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`linear` as an operator that `torch.compile`d code can call."""
    return linear(x, weight)


@bf16_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
