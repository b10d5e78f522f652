"""bfloat16 on x86 CPUs with AVX-512 BF16: matrix products, a decode step's rope, KV-cache write and attention,
RMSNorm, SwiGLU's product.

A decode step multiplies each weight once by a few rows of activations, so it runs at the speed the weights are
read from memory. oneDNN's kernel (on its packed layout) read them at about 72 % of the machine's bandwidth where
llama.cpp's reads at about 93 %. This module's kernel, `csrc/bf16_cpu.cpp` (compiled on first use by
`llama.cpu_extension`), reads a weight that `pack` has laid out in groups of 32 output rows, each group one
sequential stream, through the processor's bfloat16 dot-product instruction (VDPBF16PS); one load of the weight
serves every row of activations, so the same kernel serves decode steps of any batch size and prompts. The same
source computes a decode step's rope and KV-cache write, its attention, an RMSNorm and SwiGLU's product in one call
each, in place of torch's many small operations, and a transformer block's whole decode step in one call
(`decode_layer`), calling the block's linear kernels by address. Where the processor lacks AVX-512 BF16, or the
source cannot be built, `available()` is False.
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


class DecodeLayer(ctypes.Structure):
    """What `decode_layer` needs of a transformer block, fixed once its weights are in place: each linear layer's
    kernel (the address of a C function computing out (M, N) = x (M, K) @ W.T in bfloat16 from (x, M, K, weight,
    N, out), as `linear_address`, `int8_cpu.linear_address` and `blocks_cpu.linear_address` give) and the weight it
    takes, the norms' weights and epsilon, attention's scale and the block's sizes (the heads it computes)."""

    _fields_ = [*((name, ctypes.c_void_p) for name in ("wqkv", "wo", "w13", "w2", "wqkv_weight", "wo_weight",
                                                       "w13_weight", "w2_weight", "attention_norm", "ffn_norm")),
                ("eps", ctypes.c_float), ("scale", ctypes.c_float),
                *((name, ctypes.c_int64) for name in ("dim", "hidden", "n_heads", "n_kv_heads", "head_dim"))]


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None (with a warning if building it failed) where it cannot run."""
    if not _processor_has_bf16():
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    signatures = {
        "llama_bf16_linear": [pointer, size, size, pointer, size, pointer],
        "llama_bf16_linear_widened": [pointer, size, size, pointer, size, pointer],
        "llama_bf16_decode_attention": [pointer, size, size, size, size, pointer, pointer, size, size, pointer,
                                        ctypes.c_float, pointer],
        "llama_bf16_rms_norm": [pointer, size, size, pointer, ctypes.c_float, pointer],
        "llama_bf16_silu_mul": [pointer, size, size, pointer],
        "llama_bf16_decode_layer": [ctypes.POINTER(DecodeLayer), pointer, size, pointer, pointer, pointer, pointer,
                                    size, size, size, pointer, pointer],
        "llama_bf16_rope_and_store": [pointer, size, size, size, size, pointer, pointer, pointer, pointer, size, size,
                                      pointer],
    }
    library = cpu_extension.load_library("llama_bf16_cpu", SOURCE, signatures, "bfloat16 on the CPU",
                                         "using oneDNN's bfloat16 kernel, which decodes slower")
    if library is not None:
        library.llama_bf16_rope_and_store.restype = ctypes.c_int64  # the rows refused
        library.llama_bf16_decode_layer.restype = ctypes.c_int64
    return library


def available() -> bool:
    """Whether this process can use the kernel: Linux on x86-64 with AVX-512 BF16 (and VNNI), and it compiled."""
    return _library() is not None


GROUP_ROWS = 32  # output rows per packed group


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A bfloat16 `weight` (out_features, in_features) in the kernel's layout: (groups, pairs, 32, 2), where
    [g, j, r, t] holds weight[32 g + r, 2 j + t], zero past the weight's rows and columns."""
    out_features, in_features = weight.shape
    groups, pairs = -(-out_features // GROUP_ROWS), -(-in_features // 2)
    if weight.shape != (groups * GROUP_ROWS, pairs * 2):
        padded = weight.new_zeros(groups * GROUP_ROWS, pairs * 2)
        padded[:out_features, :in_features] = weight
        weight = padded
    # Each pair moved as one 32-bit value: this transpose copies 2.4x faster than one of 2-byte values.
    pair_values = weight.contiguous().view(torch.int32).view(groups, GROUP_ROWS, pairs)
    return pair_values.transpose(1, 2).contiguous().view(torch.bfloat16).view(groups, pairs, GROUP_ROWS, 2)


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, widen: bool = False) -> torch.Tensor:
    """x @ weight.T for a CPU bfloat16 `x` (..., in_features) and the weight as `pack` packs it, summed in float32
    and rounded to bfloat16 once: (..., out_features). `widen` returns float32 holding those bfloat16 values, the
    numbers `.float()` of the bfloat16 result gives, written once (for logits, which the model returns in float32)."""
    if x.dtype != torch.bfloat16 or packed.dtype != torch.bfloat16 or packed.dim() != 4:
        raise ValueError(f"bf16_cpu.linear takes bfloat16 x and a weight packed by bf16_cpu.pack, got {x.dtype} x "
                         f"and a {packed.dtype} weight of shape {tuple(packed.shape)}")
    in_features = x.shape[-1]
    if -(-in_features // 2) != packed.shape[1] or -(-out_features // GROUP_ROWS) != packed.shape[0]:
        raise ValueError(f"x has {in_features} features and asks for {out_features}, but the packed weight of shape "
                         f"{tuple(packed.shape)} takes {packed.shape[1] * 2} and gives {packed.shape[0] * GROUP_ROWS}"
                         " (both rounded up)")
    rows = x.numel() // in_features
    x2d = x.reshape(rows, in_features).contiguous()
    out = torch.empty(rows, out_features, dtype=torch.float32 if widen else torch.bfloat16)
    kernel = _library().llama_bf16_linear_widened if widen else _library().llama_bf16_linear
    kernel(x2d.data_ptr(), rows, in_features, packed.data_ptr(), out_features, out.data_ptr())
    return out.view(*x.shape[:-1], out_features)


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


def rope_and_store(qkv: torch.Tensor, rope: torch.Tensor, positions: torch.Tensor, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, slot: int, n_heads: int) -> torch.Tensor:
    """A decode step's rope and KV-cache write in one call: the query and key heads of `qkv` (rows, 1, (n_heads +
    2 n_kv_heads) * head_dim) rotated by `rope` (rows, 1, 2, 1, head_dim: their positions' rows of the model's rope
    table), row i's keys and values stored at position positions[i, 0] of KV slot slot + i of `cache_k` and
    `cache_v` (slots, max_seq_len, n_kv_heads, head_dim); returns the rotated queries (rows, 1, n_heads, head_dim).
    The same numbers as `llama.model.apply_rope` then `KVCache.update`. All bfloat16 on the CPU but `rope` (float32)
    and `positions` (int64); head_dim a multiple of 16. Raises ValueError for a slot or position outside the cache."""
    rows = qkv.shape[0]
    _, max_seq_len, n_kv_heads, head_dim = cache_k.shape
    offset = _slots_offset(cache_k, slot, rows)
    qkv, rope, positions = qkv.contiguous(), rope.contiguous(), positions.contiguous()
    q = qkv.new_empty(rows, 1, n_heads, head_dim)
    refused = _library().llama_bf16_rope_and_store(
        qkv.data_ptr(), rows, n_heads, n_kv_heads, head_dim, rope.data_ptr(), positions.data_ptr(),
        cache_k.data_ptr() + offset, cache_v.data_ptr() + offset, cache_k.stride(0), max_seq_len, q.data_ptr())
    if refused:
        raise _outside_cache(positions, max_seq_len)
    return q


def _slots_offset(cache: torch.Tensor, slot: int, rows: int) -> int:
    """The byte offset of KV slot `slot` in `cache` (slots, max_seq_len, ...); ValueError unless slots [slot, slot +
    rows) are within it."""
    if not 0 <= slot <= cache.shape[0] - rows:
        raise ValueError(f"slots [{slot}, {slot + rows}) are outside the cache's {cache.shape[0]}")
    return slot * cache.stride(0) * cache.element_size()


def _outside_cache(positions: torch.Tensor, max_seq_len: int) -> ValueError:
    return ValueError(f"positions {positions.flatten().tolist()} must lie in [0, max_seq_len={max_seq_len})")


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


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's product silu(gate) * up in one call, for a bfloat16 CPU `gate_up` (..., 2 * hidden) that holds each
    row's gate values then its up values: (..., hidden), rounded to bfloat16 after silu and after the product as
    torch rounds them. Only silu's exponential is the kernel's own: a result can differ from torch's by one
    bfloat16 step where silu's float32 value lies that close to a rounding boundary."""
    if gate_up.device.type != "cpu" or gate_up.dtype != torch.bfloat16 or gate_up.shape[-1] % 2:
        raise ValueError(f"silu_mul takes a bfloat16 CPU tensor of an even width, got {gate_up.dtype} on "
                         f"{gate_up.device} of shape {tuple(gate_up.shape)}")
    hidden = gate_up.shape[-1] // 2
    gate_up = gate_up.contiguous()
    out = gate_up.new_empty(*gate_up.shape[:-1], hidden)
    _library().llama_bf16_silu_mul(gate_up.data_ptr(), gate_up.numel() // max(1, 2 * hidden), hidden, out.data_ptr())
    return out


def linear_address() -> int:
    """The address of the C function behind `linear`, for `DecodeLayer`."""
    return ctypes.cast(_library().llama_bf16_linear, ctypes.c_void_p).value


def decode_layer(layer: DecodeLayer, x: torch.Tensor, positions: torch.Tensor, rope: torch.Tensor,
                 visible: Optional[torch.Tensor], cache_k: torch.Tensor, cache_v: torch.Tensor, slot: int,
                 kv_len: Optional[int]) -> torch.Tensor:
    """A transformer block's decode step in one call: x (rows, 1, dim) bfloat16 at `positions` (rows, 1) of KV
    slots [slot, slot + rows) of `cache_k` and `cache_v`, `rope` their rows of the rope table, attention over
    positions [0, kv_len) (None: all) that `visible` (rows, 1, 1, kv_len) allows (None: all). The same numbers as
    the block's modules computing through this module's kernels (`rms_norm`, `rope_and_store`,
    `decode_attention`, `silu_mul`, the linear layers' own), one after another. Raises ValueError as
    `rope_and_store` does, before anything is written."""
    rows, max_seq_len = x.shape[0], cache_k.shape[1]
    offset = _slots_offset(cache_k, slot, rows)
    x, rope, positions = x.contiguous(), rope.contiguous(), positions.contiguous()
    kv_len = max_seq_len if kv_len is None else kv_len
    if visible is not None:
        visible = visible.reshape(rows, kv_len).contiguous()
    out = torch.empty_like(x)
    if _library().llama_bf16_decode_layer(
            layer, x.data_ptr(), rows, rope.data_ptr(), positions.data_ptr(), cache_k.data_ptr() + offset,
            cache_v.data_ptr() + offset, cache_k.stride(0), max_seq_len, kv_len,
            None if visible is None else visible.data_ptr(), out.data_ptr()):
        raise _outside_cache(positions, max_seq_len)
    return out


@torch.library.custom_op("llama::bf16_linear", mutates_args=())
def bf16_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, widen: bool = False) -> torch.Tensor:
    """`linear` as an operator that `torch.compile`d code can call."""
    return linear(x, packed, out_features, widen)


@bf16_linear.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, out_features: int, widen: bool = False) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features, dtype=torch.float32 if widen else x.dtype)
