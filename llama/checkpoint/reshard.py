"""Rewriting a Meta checkpoint for another model-parallel size (a divisor or multiple of its shard count)."""

from collections.abc import Iterator
from pathlib import Path
from typing import Union

import torch

from llama.args import ModelArgs
from llama.checkpoint.layout import gather_shard, stored_tensors
from llama.checkpoint.load import check_world_size, read_params, shard_paths, shard_reader
from llama.checkpoint.write import check_destination, write_meta_checkpoint


def reshard_checkpoint(src: Union[str, Path], dst: Union[str, Path], model_parallel_size: int,
                       overwrite: bool = False) -> Path:
    """Rewrite the Meta checkpoint `src` as `model_parallel_size` shards in `dst`, one output shard in memory at a time.

    Tensors are copied bit for bit, so resharding M -> K -> M gives back identical files' tensors. A checkpoint of
    GGUF blocks stays one; its weights split by columns (wo, w2) only at block boundaries.
    """
    src, dst = Path(src), Path(dst)
    check_destination(dst, overwrite, sources=[src])
    args = ModelArgs.from_params(read_params(src))
    paths = shard_paths(src)
    read_shard = shard_reader(paths, args)
    stored = stored_tensors(args, read_shard(0))  # params.json checked against the files before anything is sized
    check_world_size(src, args, len(paths), model_parallel_size)

    def shard_tensors(part: int) -> Iterator[tuple[str, torch.Tensor]]:
        for name, (key, _, _) in stored.items():  # a weight, or a tensor of its GGUF blocks
            yield name, gather_shard(read_shard, len(paths), key, args, part, model_parallel_size, name)

    tokenizer = src / "tokenizer.model"
    return write_meta_checkpoint(dst, src / "params.json", model_parallel_size, shard_tensors,
                                 tokenizer if tokenizer.is_file() else None, overwrite, sources=[src])
