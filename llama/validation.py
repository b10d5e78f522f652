"""Checks of what users pass to `Llama`, shared by the library and the command lines, so that bad values are
refused, naming the argument and what is valid, before any work."""

from typing import Any, Optional

import torch

from llama.devices import default_dtype, parse_device, parse_dtype
from llama.kernels import check_quantize
from llama.sampling import check_int


def check_build_values(max_seq_len: Any, max_batch_size: Any, model_parallel_size: Any, seed: Any,
                       device: Any, dtype: Any, quantize: Any, compile: Any,
                       prompt_lookup: Any = None, prefix_reuse: Any = True) -> tuple[torch.device, torch.dtype]:
    """Check `Llama.build`'s values (not its files); return the device and dtype to use."""
    check_int("max_seq_len", max_seq_len)
    check_int("max_batch_size", max_batch_size)
    check_int("model_parallel_size", model_parallel_size, optional=True)
    check_int("seed", seed, minimum=0)
    check_quantize(quantize)
    for name, flag in (("compile", compile), ("prefix_reuse", prefix_reuse)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be True or False, got {flag!r}")
    check_int("prompt_lookup", prompt_lookup, minimum=0, optional=True)
    device = parse_device(device)
    return device, parse_dtype(dtype) if dtype is not None else default_dtype(device)


def check_max_gen_len(max_gen_len: Optional[int], max_seq_len: int) -> int:
    """`max_gen_len`, or max_seq_len for None, checked to be an int >= 0."""
    max_gen_len = max_seq_len if max_gen_len is None else max_gen_len
    check_int("max_gen_len", max_gen_len, minimum=0)
    return max_gen_len
