"""Where a model runs and in what precision: the defaults, checking what a user names, and preparing the CPU."""

import ctypes
import functools
import os
import platform

import torch

# The dtypes the model computes in; integer and 8-bit float types are for storage (see llama.kernels), not compute.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA (this process's local GPU under torchrun) when available, else Apple MPS, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _available() -> str:
    names = ["cpu"] + (["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
                       if torch.cuda.is_available() else [])
    return ", ".join(names + (["mps"] if torch.backends.mps.is_available() else []))


def parse_device(device: str | torch.device | None) -> torch.device:
    """The device named (default: `default_device()`), checked to exist here; a bare "cuda" under torchrun is the
    GPU of this process's local rank."""
    if device is None:
        return default_device()
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be a device name such as cpu, cuda, cuda:1 or mps, got {device!r} "
                         f"(available here: {_available()})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} is not available: torch sees no CUDA GPU (available here: "
                             f"{_available()})")
        if parsed.index is None:
            parsed = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if parsed.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s) "
                             f"(available here: {_available()})")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} is not available (available here: {_available()})")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device type {parsed.type!r} is not supported (available here: {_available()})")
    return parsed


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the device supports it (CPU, recent CUDA GPUs), else float16."""
    if device.type == "cpu" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """One of the dtypes the model computes in (float32, bfloat16, float16), given as itself or by name."""
    parsed = DTYPES.get(dtype.removeprefix("torch.")) if isinstance(dtype, str) else dtype
    if parsed not in DTYPES.values():
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return parsed


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4


@functools.cache
def keep_freed_cpu_memory() -> None:
    """Have glibc keep freed memory blocks for reuse, instead of giving them back to the kernel.

    By default glibc maps blocks of 128 KB and more anew when they are allocated and returns them when they are
    freed (or trims its heap), so each layer of a prompt faults the pages of its activations in again, and page
    faults are slow, in a virtual machine most of all (README's benchmark section has the figures). Blocks of up
    to 32 MB are then served from its heap, and larger ones too (a prompt's logits: 0.37 GB for 512 positions of
    Llama 3's vocabulary), since no threshold above 32 MB is accepted: glibc maps nothing more, and blocks come
    from its heap, whose free top it keeps up to 1 GB. Peak memory stays the same; memory freed after a long prompt
    stays with the process for the next one. It applies to the whole process, as `torch.set_num_threads` does, and
    does nothing where the C library is not glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL(None)  # the C library this process already uses
    libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest glibc accepts on 64-bit systems
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(_M_MMAP_MAX, 0)
