"""Where a model runs and in what precision: the defaults, and parsing what a user names."""

import os

import torch


def default_device() -> torch.device:
    """CUDA (this process's local GPU under torchrun) when available, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device supports it (CPU, recent CUDA GPUs), else float16."""
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating-point torch dtype, given as itself or by name ("bfloat16", "float16", "float32")."""
    parsed = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as bfloat16, float16 or float32, got {dtype!r}")
    return parsed
