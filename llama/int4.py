"""Weight-only 4-bit linear layers (`quantize="int4"`), computed by torch's own int4 kernels.

Each row of a weight is cut into groups of `group_size` input values, and each group keeps a scale and a zero
point (asymmetric quantization): a value w becomes q in 0..15 with w ≈ (q - 8) * scale + zero. That is the form
both of torch's kernels take, so the layer hands them its values unchanged:
- on the CPU, `torch.ops.aten._weight_int4pack_mm_for_cpu` (activations of any float dtype, with scales and zero
  points in the same dtype, but vectorized for bfloat16 only), on the weight packed by
  `_convert_weight_to_int4pack_for_cpu`: two values a byte, in blocks of 64 rows (32 without AVX-512);
- on CUDA, `_weight_int4pack_mm` (the tinygemm kernel gpt-fast uses: bfloat16 activations, scales and zero points,
  compute capability 8.0 or later), on its tensor-core layout from `_convert_weight_to_int4pack`.
Only the packed values (half a byte a weight) and the scales and zero points are kept.
"""

import torch
from torch import nn

from llama.file_pages import row_chunks

GROUP_SIZE = 32  # input values that share a scale and a zero point (README's "int4" section says why 32)
GROUP_SIZES = (32, 64, 128, 256)  # what both kernels take
ROW_MULTIPLE = 16  # the CPU packing takes rows in multiples of 16 (and ROCm's tinygemm tiles are 16 rows)
ROW_BLOCK = 64  # the CPU packing's blocks of rows, each packed on its own; a chunk of rows starts at one
QUANTIZE_CHUNK_BYTES = 1 << 22  # float32 temporaries of ~16 MB at a time, not of the whole matrix


def quantize_int4(weight: torch.Tensor, group_size: int,
                  dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, scale, zero) of `weight` (rows, in_features): q int32 in 0..15 of the weight's shape, scale and zero
    (rows, in_features / group_size) in `dtype`, such that w ≈ (q - 8) * scale + zero within scale / 2.

    The group's minimum and maximum are q = 0 and q = 15 (zero is its midpoint plus half a step). q is rounded from
    the scale and zero point as stored in `dtype`, so that the bound holds for what the kernels compute with.
    """
    groups = weight.float().unflatten(1, (-1, group_size))
    low, high = groups.amin(-1), groups.amax(-1)
    # A constant group has no range; any positive scale keeps it exact (q = 8 gives the zero point).
    scale = ((high - low) / 15).clamp(min=torch.finfo(dtype).tiny).to(dtype)
    zero = ((low + high) / 2 + scale.float() / 2).to(dtype)
    steps = (groups - zero.float()[..., None]) / scale.float()[..., None] + 8
    q = steps.round_().clamp_(0, 15).to(torch.int32).flatten(1)
    return q, scale, zero


def check_kernel(device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError unless torch has an int4 kernel for `device` and activations of `dtype`."""
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


def _pack(q: torch.Tensor) -> torch.Tensor:
    """q (rows, in_features) int32 in 0..15 in the layout of the kernel for its device."""
    if q.device.type == "cuda":
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # the kernel's input: even columns in the high nibble
        inner_k_tiles = next(t for t in (8, 4, 2) if q.shape[1] % (16 * t) == 0)  # the widest loads that fit
        return torch.ops.aten._convert_weight_to_int4pack(pairs.contiguous(), inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # the CPU layout has no tiles to choose


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class Int4Linear(nn.Module):
    """x @ weight.T with the weight (out_features, in_features) in 4 bits, a scale and zero point per group of
    `group_size` input values (see the module's docstring); `weight` itself is a shape-only meta parameter.

    Raises ValueError if `group_size` does not divide in_features. Rows are padded to a multiple of 16 with zero
    scales, and the padded outputs dropped.
    """

    def __init__(self, weight: torch.Tensor, group_size: int = GROUP_SIZE) -> None:
        super().__init__()
        out_features, in_features = weight.shape
        if group_size not in GROUP_SIZES or in_features % group_size:
            raise ValueError(f'quantize="int4" needs in-features that are a multiple of its group size '
                             f"{group_size} (one of {GROUP_SIZES}), got a weight of {in_features}")
        dtype = torch.bfloat16 if weight.device.type == "cuda" else weight.dtype  # what the kernels take
        rows = _round_up(out_features, ROW_MULTIPLE)
        scales_and_zeros = weight.new_zeros(in_features // group_size, rows, 2, dtype=dtype)  # the kernels' layout
        packed = None
        chunk = max(1, QUANTIZE_CHUNK_BYTES // (4 * in_features) // ROW_BLOCK) * ROW_BLOCK
        for start, rows_of_weight in row_chunks(weight, chunk):  # a mapped weight's file pages go chunk by chunk
            q, scale, zero = quantize_int4(rows_of_weight, group_size, dtype)
            scales_and_zeros[:, start:start + len(q)] = torch.stack([scale.T, zero.T], dim=-1)
            padding = min(chunk, rows - start) - len(q)  # zero rows at the end, whose scale stays 0
            part = _pack(nn.functional.pad(q, (0, 0, 0, padding)))
            rows_per_entry = (len(q) + padding) // part.shape[0]  # 1 on the CPU, 8 on CUDA
            if packed is None:
                packed = part.new_empty(rows // rows_per_entry, *part.shape[1:])
            packed[start // rows_per_entry:start // rows_per_entry + part.shape[0]] = part
        self.weight = nn.Parameter(torch.empty_like(weight, device="meta"), requires_grad=False)
        self.group_size = group_size
        # Derived from the weights, not checkpoint tensors: kept out of the state dict, as int8's scales are.
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scales_and_zeros", scales_and_zeros, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_features, in_features = self.weight.shape
        x2d = x.reshape(-1, in_features).to(self.scales_and_zeros.dtype).contiguous()
        if x.device.type == "cuda":
            out = torch.ops.aten._weight_int4pack_mm(x2d, self.packed, self.group_size, self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2d, self.packed, self.group_size,
                                                            self.scales_and_zeros)
        if out.shape[1] != out_features:  # padded rows
            out = out[:, :out_features]
        return out.to(x.dtype).reshape(*x.shape[:-1], out_features)

