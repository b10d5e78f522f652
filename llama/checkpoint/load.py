"""Reading a Meta checkpoint at run time: the folder checked, and this process's share of the model loaded."""

import ctypes
import dataclasses
import functools
import json
import math
import os
import pickle
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from llama.args import ModelArgs
from llama.checkpoint.layout import (blocks_of, gather_shard, n_local_kv_heads, param_shapes, shard_dim,
                                     stored_keys, stored_kind, stored_tensors, take_shard, valid_world_sizes)
from llama.file_pages import release_file_pages
from llama.kernels import BlockEmbedding, ConcatLinear, block_linear, plain_linear
from llama.model import STACKED_META_KEYS, Transformer
from llama.parallel import join_shards, shard_model

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
PROGRESS_MIN_BYTES = 1 << 30  # loads smaller than this finish too fast to need a progress line

# The model's stacked projections and the Meta tensors they stack, by row (see llama.model).
def meta_sources(name: str) -> list[str]:
    """The Meta state-dict keys whose rows, stacked in order, make the model's parameter `name`."""
    module, _, leaf = name.rpartition(".")
    module, _, stacked = module.rpartition(".")
    if stacked in STACKED_META_KEYS and leaf == "weight":
        return [f"{module}.{source}.weight" for source in STACKED_META_KEYS[stacked]]
    return [name]


def read_params(ckpt_dir: Path) -> dict:
    """The params.json dict of a Meta checkpoint folder, checked to describe a model (errors name the file)."""
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {ckpt_dir}")
    path = ckpt_dir / "params.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a Meta checkpoint folder holds params.json, tokenizer.model "
                                "and consolidated.00.pth ...")
    try:
        params = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(params, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(params).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unknown keys are warned about where the params are used
        try:
            ModelArgs.from_params(params)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
    return params


def shard_paths(ckpt_dir: Path) -> list[Path]:
    """`consolidated.00.pth` .. `consolidated.{K-1:02d}.pth`, checked to be numbered without gaps."""
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shards:
        raise FileNotFoundError(f"no consolidated.NN.pth shard files in {ckpt_dir}")
    expected = [ckpt_dir / f"consolidated.{i:02d}.pth" for i in range(len(shards))]
    if shards != expected:
        missing = sorted(set(expected) - set(shards))
        raise ValueError(f"shard files in {ckpt_dir} are not numbered 00..{len(shards) - 1:02d} without gaps"
                         + (f": {missing[0].name} is missing" if missing else ""))
    return shards


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map one shard's tensors; never unpickles code."""
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        raise ValueError(f"{path} holds more than tensors and was refused (weights_only loading): {error}") from None
    except (RuntimeError, EOFError, OSError) as error:
        raise ValueError(f"{path} is truncated or not a torch checkpoint: {error}") from None
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} must hold a dict of tensors, not {type(state_dict).__name__}")
    return state_dict


def _check_shard(path: Path, state_dict: dict[str, torch.Tensor], args: ModelArgs, part: int, parts: int) -> None:
    """Raise ValueError naming `path` unless it holds exactly the tensors shard `part` of `parts` should."""
    names = [key for key in state_dict if isinstance(key, str)]  # a hostile file's keys need not be str
    expected = stored_tensors(args, names)
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys(), key=str)
    if missing or unexpected:
        raise ValueError(f"{path} does not match params.json: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}")
    for stored, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):  # weights_only loading also lets lists, numbers and strings through
            raise ValueError(f"{path}: {stored} is a {type(tensor).__name__}, not a tensor")
        key, full_shape, dtype = expected[stored]
        if dtype is None and not tensor.is_floating_point():
            raise ValueError(f"{path}: {stored} has dtype {tensor.dtype}; weights must be floating point")
        if dtype is not None and tensor.dtype != dtype:
            raise ValueError(f"{path}: {stored} has dtype {tensor.dtype}; GGUF blocks store it as {dtype}")
        expected_shape = list(full_shape)
        dim = shard_dim(key)
        if dim is not None:  # this shard's share, cut as it was written
            share = take_shard(torch.empty(full_shape, device="meta"), key, args, part, parts, stored)
            expected_shape[dim] = share.shape[dim]
        if list(tensor.shape) != expected_shape:
            raise ValueError(f"{path}: {stored} has shape {tuple(tensor.shape)} but params.json implies "
                             f"{tuple(expected_shape)} for shard {part} of {parts}")


def shard_reader(
    paths: list[Path], args: ModelArgs, shards: Optional[dict[int, dict[str, torch.Tensor]]] = None
) -> Callable[[int], dict[str, torch.Tensor]]:
    """`read_shard(m)`: shard m memory-mapped and checked against `args`, opened on first use (kept in `shards`)."""
    shards = {} if shards is None else shards

    def read_shard(m: int) -> dict[str, torch.Tensor]:
        if m not in shards:
            shards[m] = load_shard(paths[m])
            _check_param_count(paths, args)
            _check_shard(paths[m], shards[m], args, m, len(paths))
        return shards[m]

    return read_shard


def _check_param_count(paths: list[Path], args: ModelArgs) -> None:
    """Raise ValueError if params.json claims more parameters than the shard files hold (a byte each at least, a
    quarter of a byte in GGUF blocks), before anything lists the tensors of a model that may be absurdly large."""
    count, size = sum(param_counts(args)), sum(path.stat().st_size for path in paths)
    if count // (4 if args.quantization else 1) > size:
        folder = paths[0].parent
        raise ValueError(f"{folder / 'params.json'} describes {count:,} parameters, more than the {size:,} bytes of "
                         f"shard files in {folder} can hold (params.json and the shards must belong together)")


def param_counts(args: ModelArgs) -> tuple[int, int]:
    """(linear weights, other parameters) of the full model, counted without listing every layer."""
    linear = other = 0
    for key, shape in param_shapes(dataclasses.replace(args, n_layers=1)).items():
        count = math.prod(shape) * (args.n_layers if key.startswith("layers.") else 1)
        if len(shape) == 2 and key != "tok_embeddings.weight":
            linear += count
        else:
            other += count
    return linear, other


def _device_memory(device: torch.device) -> Optional[int]:
    """Total memory of `device` in bytes (for the CPU and Apple's GPUs, the physical RAM), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type in ("cpu", "mps"):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):  # not a POSIX system that says
            return None
    return None


def check_fits(ckpt_dir: Path, args: ModelArgs, world_size: int, device: torch.device, dtype: torch.dtype) -> None:
    """Raise ValueError, giving the sizes, unless this process's weights and KV cache fit in the device's memory.

    Linear weights are counted at half a byte each, what int4 quantization stores them in, so that nothing that
    could fit is refused; the rest of the weights and the KV cache are counted in `dtype`. A checkpoint of GGUF
    blocks counts what its shard files store.
    """
    linear, other = param_counts(args)
    weights = (linear // 2 + other * dtype.itemsize) // world_size
    if args.quantization is not None:
        weights = sum(path.stat().st_size for path in shard_paths(ckpt_dir)) // world_size
    kv_cache = (2 * args.n_layers * args.max_batch_size * args.max_seq_len * n_local_kv_heads(args, world_size)
                * args.head_dim * dtype.itemsize)
    memory = _device_memory(device)
    if linear + other < 2**63 and (memory is None or weights + kv_cache <= memory):  # torch counts elements in int64
        return
    limit = f"the {_gb(memory)} of memory of {device}" if memory is not None else "what torch can address"
    raise ValueError(f"{ckpt_dir / 'params.json'}: the model does not fit: its weights need at least {_gb(weights)} "
                     f"in each of {world_size} process(es) and its KV cache (max_batch_size {args.max_batch_size} × "
                     f"max_seq_len {args.max_seq_len}) {_gb(kv_cache)}, more than {limit} (lower max_seq_len or "
                     "max_batch_size, or use more processes)")


def _gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.3g} GB"


def check_world_size(ckpt_dir: Path, args: ModelArgs, n_shards: int, world_size: int) -> None:
    """Raise ValueError, listing the valid counts, unless `world_size` processes can run `n_shards` shards."""
    valid = valid_world_sizes(args, n_shards)
    if world_size not in valid:
        raise ValueError(f"{ckpt_dir} has {n_shards} shards and cannot be split over {world_size} processes; "
                         f"valid process counts (torchrun --nproc_per_node) are {valid}")


class _Progress:
    """'Loading weights: N% of X GB' on stderr, for loads large enough to take a while."""

    def __init__(self, total_bytes: int, show: bool) -> None:
        self.total, self.done, self.shown = total_bytes, 0, -1
        self.show = show and total_bytes >= PROGRESS_MIN_BYTES

    def add(self, nbytes: int, copied: bool) -> None:
        self.done += nbytes
        # Tensors used in place cost nothing now (they are read on first use); only copies deserve progress.
        percent = 100 * self.done // self.total
        if self.show and copied and percent > self.shown:
            self.shown = percent
            print(f"\rLoading weights: {percent}% of {self.total / 1e9:.1f} GB", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.shown >= 0:
            print(file=sys.stderr)


def _shares_storage(tensors: list[torch.Tensor], sources: list[torch.Tensor]) -> bool:
    pointers = {s.untyped_storage().data_ptr() for s in sources}
    return any(t.device.type == "cpu" and t.untyped_storage().data_ptr() in pointers for t in tensors)


def load_model(
    ckpt_dir: Path,
    args: ModelArgs,
    model_parallel_rank: int,
    model_parallel_size: int,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = False,
    make_linear: Callable[[torch.Tensor], nn.Module] = plain_linear,
) -> Transformer:
    """This rank's share of the model, from a checkpoint written for any compatible model-parallel size.

    The model is built on the meta device and this rank's tensors are put in place: shards are memory-mapped and
    only the slices this rank holds are read; tensors already on the right device in the right dtype are used as
    they are, without a copy. `make_linear(weight)` makes the layer that computes with each loaded linear weight
    (see `llama.kernels.linear_kernel`; default: a plain `nn.Linear`), one at a time as they load.
    """
    check_fits(ckpt_dir, args, model_parallel_size, device, dtype)
    paths = shard_paths(ckpt_dir)
    check_world_size(ckpt_dir, args, len(paths), model_parallel_size)
    shards: dict[int, dict[str, torch.Tensor]] = {}
    read_shard = shard_reader(paths, args, shards)
    with torch.device("meta"):
        model = Transformer(args).requires_grad_(False)  # inference only (and int8 weights cannot take gradients)
    shard_model(model, model_parallel_rank, model_parallel_size)
    linears = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = model.state_dict()
    total = (sum(path.stat().st_size for path in paths) // model_parallel_size if args.quantization
             else sum(t.numel() for t in expected.values()) * dtype.itemsize)  # what the blocks store, or the dtype's
    progress = _Progress(total, show_progress)
    kinds = {key: stored_kind(read_shard(0), key) for key in param_shapes(args)} if args.quantization else {}
    for name in expected:
        if kinds and any(kinds[key] != "float" for key in meta_sources(name)):  # blocks, or a tied output
            read = functools.partial(gather_shard, read_shard, len(paths), args=args, part=model_parallel_rank,
                                     parts=model_parallel_size)
            nbytes = _install_blocks(model, name, kinds, read, model_parallel_rank, device, dtype, make_linear,
                                     shards)
            progress.add(nbytes, copied=True)
            _return_freed_heap()  # the packing's temporaries
            continue
        pieces = [gather_shard(read_shard, len(paths), key, args, model_parallel_rank, model_parallel_size)
                  for key in meta_sources(name)]
        tensor = _stack_on(pieces, device, dtype)
        sources = [shard[key] for shard in shards.values() for key in meta_sources(name)]
        in_place = _shares_storage([tensor], sources)
        if not in_place:  # a copy (stacked, converted or moved): the file pages are not needed again
            _release_all(sources)
        kept = _install(model, name, tensor, make_linear if name in linears else None)
        copied = not _shares_storage(kept, sources)
        if in_place and copied:  # the layer made its own copy (int8, packed)
            _release_all(sources)
        progress.add(tensor.nbytes, copied)
        del tensor, kept  # a stacked copy is gone once its layer holds what it computes with
        _return_freed_heap()
    progress.close()
    join_shards(model, model_parallel_size)
    return model


def _stack_on(pieces: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The pieces, stacked by rows, as one contiguous tensor on `device` in `dtype` (one piece: itself if it is)."""
    # contiguous(): a column slice would otherwise keep reading the whole memory-mapped tensor. Stacked pieces are
    # moved first, so that they are joined where they will stay.
    if len(pieces) == 1:
        return pieces[0].to(device=device, dtype=dtype).contiguous()
    return torch.cat([piece.to(device=device, dtype=dtype) for piece in pieces])


def _install(model: nn.Module, name: str, tensor: torch.Tensor, make_linear: Optional[Callable]) -> list:
    """Put `tensor` in `model` as parameter `name` or, for a linear weight, as the layer `make_linear` makes of it;
    return the tensors the model now keeps for it."""
    owner, _, attribute = name.rpartition(".")
    if make_linear is None:
        setattr(model.get_submodule(owner), attribute, nn.Parameter(tensor, requires_grad=False))
        return [tensor]
    module = make_linear(tensor)
    model.set_submodule(owner, module)
    return [*module.parameters(), *module.buffers()]


def _install_blocks(model: Transformer, name: str, kinds: dict[str, Optional[str]], read: Callable, rank: int,
                    device: torch.device, dtype: torch.dtype, make_linear: Callable, shards: dict) -> int:
    """Put in `model` the layer for parameter `name` of a checkpoint of GGUF blocks (see `stored_tensors`), whose
    weights are stored as `kinds` says; `read(key, stored=...)` reads this process's share of a stored tensor.
    Returns the bytes read."""
    owner = name.rpartition(".")[0]
    if name == "output.weight" and kinds[name] is None:  # tied: the embedding's layer, or a layer of its weight
        embedding = model.tok_embeddings
        model.set_submodule(owner, embedding.layer if isinstance(embedding, BlockEmbedding)
                            else make_linear(embedding.weight))
        return 0
    pieces, sources = [], []
    for key in meta_sources(name):
        stored = stored_keys(key, kinds[key])
        loaded = {part: read(key, stored=part).to(device).contiguous() for part in stored}
        pieces.append(loaded[key].to(dtype) if kinds[key] == "float" else blocks_of(loaded.get, key, kinds[key]))
        sources += [shard[part] for shard in shards.values() for part in stored if part in shard]
    layer = _block_layer(pieces, make_linear, dtype)
    if not _shares_storage([*layer.parameters(), *layer.buffers()], sources):
        _release_all(sources)
    if name == "tok_embeddings.weight":  # this process's rows of the vocabulary
        rows = layer.weight.shape[0]
        layer = BlockEmbedding(layer, rank * rows, rows, dtype)
    model.set_submodule(owner, layer)
    return sum(tensor.nbytes for tensor in sources)


def _block_layer(pieces: list, make_linear: Callable, dtype: torch.dtype) -> nn.Module:
    """The layer that computes with the weights `pieces` (blocks or tensors) stacked by rows: one block layer where
    they are blocks of one form, else one layer each, side by side."""
    first = pieces[0]
    if not isinstance(first, torch.Tensor) and len(pieces) == 1:  # as they are: no copy beside the file's pages
        return block_linear(first, dtype)
    if not isinstance(first, torch.Tensor) and all(type(piece) is type(first) for piece in pieces):
        fields = [field.name for field in dataclasses.fields(first)]
        joined = type(first)(*(torch.cat([getattr(piece, field) for piece in pieces]) for field in fields))
        return block_linear(joined, dtype)
    layers = [make_linear(p) if isinstance(p, torch.Tensor) else block_linear(p, dtype) for p in pieces]
    return layers[0] if len(layers) == 1 else ConcatLinear(layers)


def _release_all(tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        release_file_pages(tensor)


def _return_freed_heap() -> None:
    # Freed copies of a few MB stay in glibc's heap, counted in the process's memory, unless trimmed.
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
