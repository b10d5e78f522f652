"""A safetensors writer that aligns every tensor's data in the file, so that transformers, which computes with
memory-mapped weights in place, gets weights as aligned as ours (benchmarks/README.md says why that matters)."""

import json
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
ALIGNMENT = 64  # bytes; what torch's own checkpoint format gives every tensor


def write_aligned_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file whose data section starts at a multiple of ALIGNMENT bytes in the file.

    transformers memory-maps safetensors weights and computes with them in place when the dtype matches. The
    format only pads its header to 8 bytes, so which alignment a file's tensors get depends on its header length,
    i.e. on chance, and misaligned weights make matmuls slower (benchmarks/README.md has the measurement). Padding
    the header (the format allows trailing spaces) makes transformers' figures reproducible and comparable with
    ours, whose checkpoint format aligns tensors to 64 bytes. The format wants tensors back to back, so each tensor
    is aligned too only if those before it have sizes that are multiples of ALIGNMENT, as every preset's do; the
    workers report any weight that still ends up misaligned. Tensors are streamed to the file one at a time, so no
    second copy of the model is held in memory.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name}: cannot write dtype {tensor.dtype} (supported: {list(SAFETENSORS_DTYPES)})")
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % ALIGNMENT)  # the data section then starts aligned as well
    with open(path, "wb") as file:
        file.write(len(encoded).to_bytes(8, "little") + encoded)
        for tensor in tensors.values():
            file.write(tensor.contiguous().view(torch.uint8).numpy().data)
