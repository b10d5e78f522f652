"""Pages of memory-mapped checkpoint tensors, let go once their data has been copied or quantized elsewhere.

A checkpoint is memory-mapped, so the pages a loader reads count towards the process's memory until the whole file
is unmapped. Without letting them go, a converted or quantized copy of a weight sits beside the pages it came from:
for the 1B model's 0.49 GiB output layer that was most of the peak while loading int8 and int4 weights. The kernel
reads a released page from the file again if it is touched, so the tensors stay valid. Linux only; elsewhere
nothing is released.
"""

import ctypes
import mmap
import sys
from collections.abc import Iterator

import torch

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4  # Linux's madvise advice: drop these pages (a file mapping re-reads them if needed)


def release_file_pages(tensor: torch.Tensor) -> None:
    """Let go of the resident pages of `tensor`, a memory-mapped checkpoint tensor (or a slice of one) whose data
    has been copied elsewhere. Only whole pages inside the tensor's span are released.

    The caller must know that the tensor's memory is a file mapping: on anonymous memory this would zero the pages
    (`file_mapped` says which it is).
    """
    if _LIBC is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return
    # The span from its first element to its last (other data between the elements of a strided view lies in the
    # same file mapping, and is read again if touched).
    span = 1 + sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
    begin = tensor.data_ptr()
    start = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (begin + span * tensor.element_size()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def file_mapped(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s data lies in a mapping of a file (memory-mapped checkpoints) rather than in anonymous
    memory, according to /proc/self/maps (False where there is none)."""
    if _LIBC is None or tensor.device.type != "cpu" or tensor.numel() == 0:
        return False
    address = tensor.data_ptr()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                if low <= address < high:
                    # An anonymous mapping has inode 0; [heap], [stack] and the like are not files either.
                    return fields[4] != "0" and len(fields) == 6 and not fields[5].startswith("[")
    except OSError:
        pass
    return False


def row_chunks(weight: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, weight[start : start + rows]) for each chunk of `rows` rows in turn. Where `weight` is memory-mapped
    from a file, each chunk's pages are released once the loop asks for the next chunk (or ends), so that a
    quantizer reading it chunk by chunk never holds more than a chunk of the file's pages. (A private file mapping
    written to in place would show its file's data again in the released rows: checkpoints are only read.)"""
    releasing = file_mapped(weight)
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start : start + rows]
        yield start, chunk
        if releasing:
            release_file_pages(chunk)
