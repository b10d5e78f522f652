"""Checks of what users pass to `Llama`, shared by the library and the command lines, so that bad values are
refused, naming the argument and what is valid, before any work."""

import dataclasses
from typing import Any, Optional

import torch

from llama import int4
from llama.args import ModelArgs
from llama.checkpoint.layout import param_shapes, shard_dim, shard_range
from llama.devices import default_dtype, parse_device, parse_dtype
from llama.kernels import check_quantize
from llama.sampling import check_bool, check_int


def check_build_values(max_seq_len: Any, max_batch_size: Any, model_parallel_size: Any, seed: Any,
                       device: Any, dtype: Any, quantize: Any, compile: Any,
                       prompt_lookup: Any = None, prefix_reuse: Any = True) -> tuple[torch.device, torch.dtype]:
    """Check `Llama.build`'s values (not its files); return the device and dtype to use."""
    check_int("max_seq_len", max_seq_len)
    check_int("max_batch_size", max_batch_size)
    check_int("model_parallel_size", model_parallel_size, optional=True)
    check_int("seed", seed, minimum=0)
    check_quantize(quantize)
    check_bool("compile", compile)
    check_bool("prefix_reuse", prefix_reuse)
    check_int("prompt_lookup", prompt_lookup, minimum=0, optional=True)
    device = parse_device(device)
    dtype = parse_dtype(dtype) if dtype is not None else default_dtype(device)
    if quantize == "int4":
        int4.check_kernel(device, dtype)
    return device, dtype


def check_quantize_shapes(quantize: Optional[str], args: ModelArgs, world_size: int) -> None:
    """Raise ValueError, naming the layer, if `quantize` cannot take the linear weights that each of `world_size`
    processes holds: int4's groups must divide their in-features (wo's and w2's are split between processes).
    A checkpoint whose weights are already quantized (GGUF blocks) takes no `quantize`."""
    if quantize is not None and args.quantization is not None:
        raise ValueError(f"quantize={quantize!r} cannot apply to a checkpoint whose weights are already quantized "
                         f"(params.json \"quantization\": {args.quantization!r}: GGUF blocks, used as they are); "
                         "pass quantize=None, or import the GGUF file with --dequantize to quantize it yourself")
    if quantize != "int4":
        return
    for key, shape in param_shapes(dataclasses.replace(args, n_layers=1)).items():
        if len(shape) != 2 or key == "tok_embeddings.weight":  # the embedding is a lookup, never quantized
            continue
        start, end = shard_range(key, args, 0, world_size) if shard_dim(key) == 1 else (0, shape[1])
        if (end - start) % int4.GROUP_SIZE:
            split = f" ({shape[1]} split over {world_size} processes)" if end - start != shape[1] else ""
            raise ValueError(f'quantize="int4" needs in-features that are multiples of its group size '
                             f"{int4.GROUP_SIZE}, but {key.replace('layers.0.', 'layers.N.')} has {end - start}"
                             f'{split}; use quantize="int8" or None')


def check_max_gen_len(max_gen_len: Optional[int], max_seq_len: int) -> int:
    """`max_gen_len`, or max_seq_len for None, checked to be an int >= 0."""
    max_gen_len = max_seq_len if max_gen_len is None else max_gen_len
    check_int("max_gen_len", max_gen_len, minimum=0)
    return max_gen_len
