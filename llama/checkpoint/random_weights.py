"""Random-weight checkpoints in Meta's layout, for tests and benchmarks of the published shapes (`PRESETS`)."""

import zlib
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import torch

from llama.args import PRESETS, ModelArgs
from llama.checkpoint.layout import check_model_parallel_size, param_shapes, take_shard
from llama.checkpoint.write import write_meta_checkpoint
from llama.devices import parse_dtype


def _random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # One generator per tensor, seeded from (seed, key): the full tensor is the same however it is
    # later split, and shards can be produced one at a time without generating the others.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{key}".encode()))
    if len(shape) == 1:
        # Norm gains near 1, with enough noise that a misplaced or swapped norm changes the output.
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if key == "tok_embeddings.weight":
        return torch.randn(shape, generator=gen)
    # Linear weights (out, in): std 1/sqrt(fan_in) keeps activations O(1), so attention scores and
    # logits have a real spread instead of collapsing to uniform.
    return torch.randn(shape, generator=gen) / shape[1] ** 0.5


def _resolve_params(preset: Union[str, dict]) -> dict:
    if isinstance(preset, dict):
        return dict(preset)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")
    return dict(PRESETS[preset])


def _llama_models_tokenizer() -> Optional[Path]:
    try:
        path = resources.files("llama_models") / "llama3" / "tokenizer.model"
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def write_random_checkpoint(
    dst: Union[str, Path],
    preset: Union[str, dict] = "tiny",
    model_parallel_size: int = 1,
    seed: int = 0,
    dtype: torch.dtype | str = torch.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Write a random-weight checkpoint in Meta's layout to directory `dst` and return its path.

    `preset` is a name from PRESETS or a params.json dict. The full weights depend only on `seed`,
    not on `model_parallel_size` (the number of `consolidated.NN.pth` shards). `tokenizer.model` is
    copied from the installed `llama-models` package when it is available.
    """
    params = _resolve_params(preset)
    args = ModelArgs.from_params(params)
    check_model_parallel_size(args, model_parallel_size)
    dtype = parse_dtype(dtype)
    shapes = param_shapes(args)

    def shard_tensors(rank: int) -> Iterator[tuple[str, torch.Tensor]]:
        # Each full tensor is made, cut and (by the writer) compacted before the next.
        for key, shape in shapes.items():
            full = _random_tensor(key, shape, seed).to(dtype)
            yield key, take_shard(full, key, args, rank, model_parallel_size)

    return write_meta_checkpoint(dst, params, model_parallel_size, shard_tensors, _llama_models_tokenizer(),
                                 overwrite)
