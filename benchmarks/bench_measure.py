"""What the generation benchmark measures besides time: the machine's read bandwidth, the bytes a decode step
reads, a process's peak memory, and the bytes a loaded model and its KV cache hold. Also `synchronize`, which every
timing uses so that a clock read covers the GPU's queued work."""

import math
import time
from typing import Any

import torch


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so that a host clock read afterwards covers it."""
    if device == "cuda":
        torch.cuda.synchronize()


def decode_bytes_per_token(preset: str, dtype: torch.dtype) -> int:
    """Bytes of weights a decode step reads: all of them but the embedding table, in `dtype`."""
    from llama.args import PRESETS, ModelArgs
    from llama.checkpoint.layout import param_shapes

    shapes = param_shapes(ModelArgs.from_params(PRESETS[preset]))
    numel = sum(math.prod(shape) for key, shape in shapes.items() if key != "tok_embeddings.weight")
    return numel * dtype.itemsize


def measure_read_bandwidth(mib: int, threads: int, device: str, repeats: int = 5) -> float:
    """Best observed read bandwidth in bytes/s: summing a `mib` MiB float32 buffer (with `threads` CPU threads).

    The best rather than the median, because it estimates what the memory system can do; other processes on
    the machine can only make a run slower.
    """
    torch.set_num_threads(threads)
    buffer = torch.ones(mib * 1024 * 1024 // 4, dtype=torch.float32, device=device)  # ones: pages must exist
    buffer.sum()  # warm-up
    best = math.inf
    for _ in range(repeats):
        synchronize(device)
        started = time.perf_counter()
        buffer.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - started)
    return buffer.numel() * buffer.element_size() / best


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; benchmarks/README.md says why not ru_maxrss)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource  # not Linux: ru_maxrss is in bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers, counting shared storage once, and of the oneDNN-packed weights
    that `PackedLinear`s hold outside them (their meta `weight` records the size)."""
    from llama.kernels import PackedLinear

    total = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, PackedLinear))
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.is_meta and tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def kv_cache_bytes(spec: dict[str, Any], dtype: torch.dtype) -> int:
    """Keys and values of every layer for the largest batch at max_seq_len (what ours preallocates)."""
    from llama.args import PRESETS, ModelArgs

    args = ModelArgs.from_params(PRESETS[spec["preset"]])
    per_position = 2 * args.n_layers * args.n_kv_heads * args.head_dim * dtype.itemsize
    return per_position * max(spec["batch_sizes"]) * spec["max_seq_len"]
