"""Checkpoints in Meta's layout: loading, a random-weight writer, resharding and Hugging Face <-> Meta conversion.

Meta's layout is a directory with `params.json`, `tokenizer.model` and `consolidated.00.pth` ..
`consolidated.{K-1:02d}.pth`, one plain dict of tensors per model-parallel rank.
"""

import contextlib
import ctypes
import hashlib
import json
import math
import mmap
import os
import pickle
import shutil
import sys
import tempfile
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Optional, Union

import fire
import torch

from llama.model import (
    ROPE_HIGH_FREQ_FACTOR,
    ROPE_LOW_FREQ_FACTOR,
    ROPE_ORIGINAL_CONTEXT,
    ModelArgs,
    Transformer,
    can_pack_for_cpu,
    is_linear,
    pack_for_cpu,
    quantize_int8,
)

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4  # Linux's madvise advice: drop these pages (a file mapping re-reads them if needed)
PROGRESS_MIN_BYTES = 1 << 30  # loads smaller than this finish too fast to need a progress line

PRESETS: dict[str, dict] = {
    # Small enough for tests; hidden dim 224 (multiplier 1.3, rounded up to a multiple of 32).
    "tiny": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256,
             "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
             "use_scaled_rope": True},
    "1B": {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
           "multiple_of": 256, "ffn_dim_multiplier": 1.5, "norm_eps": 1e-05, "rope_theta": 500000.0,
           "use_scaled_rope": True},
    "3B": {"dim": 3072, "n_layers": 28, "n_heads": 24, "n_kv_heads": 8, "vocab_size": 128256,
           "multiple_of": 256, "ffn_dim_multiplier": 1.0, "norm_eps": 1e-05, "rope_theta": 500000.0,
           "use_scaled_rope": True},
    "8B": {"dim": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
           "multiple_of": 1024, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
           "use_scaled_rope": True},
    "70B": {"dim": 8192, "n_layers": 80, "n_heads": 64, "n_kv_heads": 8, "vocab_size": 128256,
            "multiple_of": 4096, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-05, "rope_theta": 500000.0,
            "use_scaled_rope": True},
}

# How Meta splits each weight across model-parallel shards, keyed by the last two components of the
# state-dict key: the dimension (None: every shard holds it whole) and the whole units it is split into,
# as (number of units, rows or columns per unit). Attention weights split by heads.
_SPLITS = {
    "tok_embeddings.weight": (0, lambda a: (a.vocab_size, 1)),
    "output.weight": (0, lambda a: (a.vocab_size, 1)),
    "wq.weight": (0, lambda a: (a.n_heads, a.head_dim)),
    "wk.weight": (0, lambda a: (a.n_kv_heads, a.head_dim)),
    "wv.weight": (0, lambda a: (a.n_kv_heads, a.head_dim)),
    "wo.weight": (1, lambda a: (a.n_heads, a.head_dim)),
    "w1.weight": (0, lambda a: (a.ffn_hidden_dim, 1)),
    "w3.weight": (0, lambda a: (a.ffn_hidden_dim, 1)),
    "w2.weight": (1, lambda a: (a.ffn_hidden_dim, 1)),
    "attention_norm.weight": (None, None),
    "ffn_norm.weight": (None, None),
    "norm.weight": (None, None),
}


def _split(key: str) -> tuple:
    suffix = ".".join(key.split(".")[-2:])
    if suffix not in _SPLITS:
        raise ValueError(f"unknown Meta state-dict key {key!r}; expected keys ending in one of {sorted(_SPLITS)}")
    return _SPLITS[suffix]


def shard_dim(key: str) -> Optional[int]:
    """Dimension along which Meta splits the tensor `key` across shards, or None if every shard has it whole."""
    return _split(key)[0]


def shard_range(key: str, args: ModelArgs, part: int, parts: int) -> tuple[int, int]:
    """Rows (or columns) [start, end) of the full tensor `key` that shard `part` of `parts` holds along its shard dim.

    With more shards than kv heads, each kv head is replicated on parts / n_kv_heads neighbouring shards.
    """
    n_units, unit = _split(key)[1](args)
    if parts <= n_units:
        first, count = part * (n_units // parts), n_units // parts
    else:
        first, count = part * n_units // parts, 1
    return first * unit, (first + count) * unit


def take_shard(full: torch.Tensor, key: str, args: ModelArgs, part: int, parts: int) -> torch.Tensor:
    """Shard `part` of `parts` of the full tensor `key` (a view)."""
    dim = shard_dim(key)
    if dim is None:
        return full
    start, end = shard_range(key, args, part, parts)
    return full.narrow(dim, start, end - start)


def _compact(tensor: torch.Tensor) -> torch.Tensor:
    # torch.save writes a tensor's whole storage; make sure that is only this tensor's elements.
    tensor = tensor.contiguous()
    return tensor if tensor.untyped_storage().nbytes() == tensor.nbytes else tensor.clone()


def gather_shard(
    read_shard: Callable[[int], dict[str, torch.Tensor]], n_shards: int, key: str, args: ModelArgs, part: int, parts: int
) -> torch.Tensor:
    """Shard `part` of `parts` of tensor `key`, cut and joined from a checkpoint of `n_shards` shards.

    `read_shard(m)` returns shard m's state dict; only the shards that hold a piece are asked for.
    """
    dim = shard_dim(key)
    if dim is None:
        return read_shard(0)[key]
    start, end = shard_range(key, args, part, parts)
    pieces, pos = [], start
    for m in range(n_shards):
        m_start, m_end = shard_range(key, args, m, n_shards)
        if m_start <= pos < m_end:  # the first shard holding the next rows; its replicas are skipped
            take = min(m_end, end) - pos
            pieces.append(read_shard(m)[key].narrow(dim, pos - m_start, take))
            pos += take
            if pos == end:
                break
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


def valid_world_sizes(args: ModelArgs, n_shards: int) -> list[int]:
    """Process counts that can run a checkpoint of `n_shards` shards: divisors or multiples of it that fit the model."""

    def fits(world_size: int) -> bool:
        try:
            args.check_model_parallel_size(world_size)
        except ValueError:
            return False
        return n_shards % world_size == 0 or world_size % n_shards == 0

    return [w for w in range(1, args.n_heads + 1) if fits(w)]


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every tensor of a Meta checkpoint, in state-dict order."""
    q_out, kv_out, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (q_out, args.dim)
        shapes[p + "attention.wk.weight"] = (kv_out, args.dim)
        shapes[p + "attention.wv.weight"] = (kv_out, args.dim)
        shapes[p + "attention.wo.weight"] = (args.dim, q_out)
        shapes[p + "feed_forward.w1.weight"] = (hidden, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, args.dim)
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating-point torch dtype, given as itself or by name ("bfloat16", "float16", "float32")."""
    parsed = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(parsed, torch.dtype) or not parsed.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype such as bfloat16, float16 or float32, got {dtype!r}")
    return parsed


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
    args.check_model_parallel_size(model_parallel_size)
    dtype = parse_dtype(dtype)

    dst = Path(dst)
    shapes = param_shapes(args)
    with output_dir(dst, overwrite) as partial:
        for rank in range(model_parallel_size):
            shard = {}
            for key, shape in shapes.items():
                full = _random_tensor(key, shape, seed).to(dtype)
                shard[key] = _compact(take_shard(full, key, args, rank, model_parallel_size))
            torch.save(shard, partial / f"consolidated.{rank:02d}.pth")
        (partial / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        tokenizer = _llama_models_tokenizer()
        if tokenizer is not None:
            shutil.copyfile(tokenizer, partial / "tokenizer.model")
        write_checklist(partial)
    return dst


def _llama_models_tokenizer() -> Optional[Path]:
    try:
        path = resources.files("llama_models") / "llama3" / "tokenizer.model"
    except ModuleNotFoundError:
        return None
    return Path(str(path)) if path.is_file() else None


def merge_shards(shards: Sequence[dict[str, torch.Tensor]], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Join a checkpoint's per-rank state dicts into the full one."""
    if not shards:
        raise ValueError("shards must contain at least one state dict")
    return {key: gather_shard(shards.__getitem__, len(shards), key, args, 0, 1) for key in shards[0]}


def _interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Meta rotates dim pairs (2i, 2i+1) of a head; HF rotates (i, i + head_dim/2). Reorder each head's
    # output rows from [pair0.a, pair0.b, pair1.a, ...] to [all .a, all .b].
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


# Names of a layer's tensors in HF `LlamaForCausalLM`, keyed by their Meta names.
_HF_LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight", "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight", "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight", "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
}
_HF_TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}


def hf_key(key: str) -> str:
    """HF `LlamaForCausalLM` name of the Meta state-dict key `key`."""
    if key in _HF_TOP_NAMES:
        return _HF_TOP_NAMES[key]
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _HF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_HF_LAYER_NAMES[parts[2]]}"
    raise ValueError(f"unknown Meta state-dict key {key!r}")


def _meta_to_hf_tensor(key: str, tensor: torch.Tensor, args: ModelArgs) -> torch.Tensor:
    if key.endswith("attention.wq.weight"):
        return _interleaved_to_rotate_half(tensor, args.n_heads)
    if key.endswith("attention.wk.weight"):
        return _interleaved_to_rotate_half(tensor, args.n_kv_heads)
    return tensor


def meta_to_hf_state_dict(state_dict: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename a full (merged) Meta state dict to HF `LlamaForCausalLM` keys, permuting wq/wk for HF's rope layout."""
    expected = param_shapes(args)
    if set(state_dict) != set(expected):
        missing, extra = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
        raise ValueError(f"state_dict does not match args: missing {missing[:5]}, unexpected {extra[:5]}")
    return {hf_key(key): _meta_to_hf_tensor(key, tensor, args) for key, tensor in state_dict.items()}


def hf_config_dict(args: ModelArgs) -> dict:
    """Keyword arguments for `transformers.LlamaConfig` describing the same architecture (transformers >= 5)."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=ROPE_LOW_FREQ_FACTOR,
                    high_freq_factor=ROPE_HIGH_FREQ_FACTOR, original_max_position_embeddings=ROPE_ORIGINAL_CONTEXT)
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        # Context the models were released with: 128K for 3.1+ (scaled rope), 8K for 3.0. Only a label
        # for these rope types; HF validates that it exceeds original_max_position_embeddings.
        "max_position_embeddings": 131072 if args.use_scaled_rope else 8192,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def read_params(ckpt_dir: Path) -> dict:
    """The params.json dict of a Meta checkpoint folder."""
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
    full_shapes = param_shapes(args)
    missing, unexpected = sorted(full_shapes.keys() - state_dict.keys()), sorted(state_dict.keys() - full_shapes.keys())
    if missing or unexpected:
        raise ValueError(f"{path} does not match params.json: missing keys {missing[:10]}, "
                         f"unexpected keys {unexpected[:10]}")
    for key, tensor in state_dict.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{path}: {key} has dtype {tensor.dtype}; weights must be floating point")
        expected = list(full_shapes[key])
        dim = shard_dim(key)
        if dim is not None:
            start, end = shard_range(key, args, part, parts)
            expected[dim] = end - start
        if list(tensor.shape) != expected:
            raise ValueError(f"{path}: {key} has shape {tuple(tensor.shape)} but params.json implies "
                             f"{tuple(expected)} for shard {part} of {parts}")


def _shard_reader(
    paths: list[Path], args: ModelArgs, shards: dict[int, dict[str, torch.Tensor]] | None = None
) -> Callable[[int], dict[str, torch.Tensor]]:
    """`read_shard(m)`: shard m memory-mapped and checked against `args`, opened on first use (kept in `shards`)."""
    shards = {} if shards is None else shards

    def read_shard(m: int) -> dict[str, torch.Tensor]:
        if m not in shards:
            shards[m] = load_shard(paths[m])
            _check_shard(paths[m], shards[m], args, m, len(paths))
        return shards[m]

    return read_shard


def _check_world_size(ckpt_dir: Path, args: ModelArgs, n_shards: int, world_size: int) -> None:
    valid = valid_world_sizes(args, n_shards)
    if world_size not in valid:
        raise ValueError(f"{ckpt_dir} has {n_shards} shards and cannot be split over {world_size} processes; "
                         f"valid process counts (torchrun --nproc_per_node) are {valid}")


def release_file_pages(tensor: torch.Tensor) -> None:
    """Let go of the resident pages of a memory-mapped checkpoint tensor whose data has been copied elsewhere.

    Pages of a mapped file count towards the process's memory until the whole file is unmapped, so without this a
    converted (or quantized) copy would sit beside the pages it was read from. The tensor stays valid: the kernel
    reads the file again if it is touched. Only whole pages inside the tensor are released. Linux only.
    """
    if _LIBC is None or tensor.device.type != "cpu":
        return
    storage = tensor.untyped_storage()
    start = -(-storage.data_ptr() // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (storage.data_ptr() + storage.nbytes()) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start:
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def load_model(
    ckpt_dir: Path,
    args: ModelArgs,
    model_parallel_rank: int,
    model_parallel_size: int,
    device: torch.device,
    dtype: torch.dtype,
    show_progress: bool = False,
    quantize: bool = False,
) -> Transformer:
    """This rank's part of the model, from a checkpoint written for any compatible model-parallel size.

    The model is built on the meta device and this rank's tensors are put in place. Shards are memory-mapped and
    only the slices this rank holds are read; tensors already in the right place, dtype and layout are used as
    they are, without a copy; on the CPU, bfloat16 linear weights are computed with from a copy in oneDNN's layout
(`pack_for_cpu`) instead. With `quantize`, linear weights become int8 (see `quantize_int8`) as they load.
    """
    paths = shard_paths(ckpt_dir)
    _check_world_size(ckpt_dir, args, len(paths), model_parallel_size)
    shards: dict[int, dict[str, torch.Tensor]] = {}
    read_shard = _shard_reader(paths, args, shards)
    with torch.device("meta"):
        model = Transformer(args).requires_grad_(False)  # inference only (and int8 weights cannot take gradients)
    linears = {f"{name}.weight": m for name, m in model.named_modules() if is_linear(m)}
    expected = model.state_dict()
    total_bytes = sum(t.numel() for t in expected.values()) * dtype.itemsize
    show_progress = show_progress and total_bytes >= PROGRESS_MIN_BYTES
    state_dict, done_bytes, shown_percent = {}, 0, -1
    for key in expected:
        tensor = gather_shard(read_shard, len(paths), key, args, model_parallel_rank, model_parallel_size)
        # contiguous(): a column slice would otherwise keep reading the whole memory-mapped tensor.
        placed = tensor.to(device=device, dtype=dtype).contiguous()
        sources = [shard[key] for shard in shards.values()]
        copied = all(placed.untyped_storage().data_ptr() != s.untyped_storage().data_ptr() for s in sources)
        if key in linears and quantize:
            placed, linears[key].scale = quantize_int8(placed)
            copied = True
        elif key in linears and not copied and can_pack_for_cpu(placed):
            # Computation uses the packed copy; the parameter stays a view of the file, read only if touched.
            linears[key].packed = pack_for_cpu(placed)
            copied = linears[key].packed is not None
        state_dict[key] = placed
        done_bytes += placed.nbytes
        if copied:
            for source in sources:
                release_file_pages(source)
        # Tensors used in place cost nothing now (they are read on first use); only copies deserve progress.
        if show_progress and copied and 100 * done_bytes // total_bytes > shown_percent:
            shown_percent = 100 * done_bytes // total_bytes
            print(f"\rLoading weights: {shown_percent}% of {total_bytes / 1e9:.1f} GB", end="", file=sys.stderr,
                  flush=True)
    if shown_percent >= 0:
        print(file=sys.stderr)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model


@contextlib.contextmanager
def output_dir(dst: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary folder beside `dst` that is renamed to `dst` only once everything in it was written.

    A non-empty `dst` is refused unless `overwrite`, so an interrupted or failed write never leaves a folder
    that looks like a valid checkpoint.
    """
    if dst.exists() and not overwrite and (not dst.is_dir() or any(dst.iterdir())):
        raise FileExistsError(f"{dst} exists and is not empty; choose another destination or pass --overwrite")
    dst.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    # mkdtemp (and some writers) make owner-only files; give the result the usual permissions of the umask.
    umask = os.umask(0)
    os.umask(umask)
    for path in [partial, *partial.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    partial.rename(dst)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checklist(folder: Path) -> None:
    """`checklist.chk`: the MD5 of every other file in `folder`, in md5sum's format, as Meta ships it."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "checklist.chk")
    (folder / "checklist.chk").write_text("".join(f"{_md5(p)}  {p.name}\n" for p in files))


def reshard_checkpoint(src: Path, dst: Path, model_parallel_size: int, overwrite: bool = False) -> Path:
    """Rewrite the Meta checkpoint `src` as `model_parallel_size` shards in `dst`, one output shard in memory at a time.

    Tensors are copied bit for bit, so resharding M -> K -> M gives back identical files' tensors.
    """
    args = ModelArgs.from_params(read_params(src))
    paths = shard_paths(src)
    _check_world_size(src, args, len(paths), model_parallel_size)
    read_shard = _shard_reader(paths, args)
    with output_dir(dst, overwrite) as partial:
        for part in range(model_parallel_size):
            shard = {key: _compact(gather_shard(read_shard, len(paths), key, args, part, model_parallel_size))
                     for key in param_shapes(args)}
            torch.save(shard, partial / f"consolidated.{part:02d}.pth")
            del shard
        shutil.copyfile(src / "params.json", partial / "params.json")
        if (src / "tokenizer.model").is_file():
            shutil.copyfile(src / "tokenizer.model", partial / "tokenizer.model")
        write_checklist(partial)
    return dst


# ---------------------------------------------------------------------------------------------------------------
# Hugging Face <-> Meta conversion (`from_hf`, `to_hf`)
# ---------------------------------------------------------------------------------------------------------------

# Meta's published (multiple_of, ffn_dim_multiplier) by (dim, ffn hidden size): 1B, 3B, 8B, 70B, 405B.
_META_FFN_PARAMS = {(2048, 8192): (256, 1.5), (3072, 8192): (256, 1.0), (4096, 14336): (1024, 1.3),
                    (8192, 28672): (4096, 1.3), (16384, 53248): (4096, 1.2)}
# The Llama 3 tokenizer's ids, written into config.json when the vocabulary has them. A base model ends text with
# <|end_of_text|>; instruct models end turns with <|eom_id|> or <|eot_id|>. A checkpoint does not say which it
# is, so all three are listed, as our own generation does.
_BOS_ID, _EOS_IDS = 128000, [128001, 128008, 128009]
_TOKENIZER_HINT = ("copy a Llama 3 tokenizer.model into it (from Meta's download, the HF repository's original/ "
                   "folder, or the llama-models package: llama_models/llama3/tokenizer.model)")


def _rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Inverse of _interleaved_to_rotate_half: each head's rows [all .a, all .b] back to [pair0.a, pair0.b, ...].
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def ffn_params_for(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) with which ModelArgs.ffn_hidden_dim is exactly `hidden` for this `dim`.

    Meta's published values are preferred; otherwise the largest power-of-two multiple_of and the shortest
    multiplier that reproduce `hidden`.
    """
    def reproduces(multiple_of: int, multiplier: Optional[float]) -> bool:
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier)
        return args.ffn_hidden_dim == hidden

    if (dim, hidden) in _META_FFN_PARAMS and reproduces(*_META_FFN_PARAMS[dim, hidden]):
        return _META_FFN_PARAMS[dim, hidden]
    base = int(2 * 4 * dim / 3)  # the hidden size before multiplier and rounding, as in ModelArgs.ffn_hidden_dim
    for multiple_of in (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if hidden % multiple_of:
            continue
        if reproduces(multiple_of, None):
            return multiple_of, None
        # Round hidden/base to as few decimals as work; the last candidate lands mid-integer, so float error
        # cannot flip int() to the neighbouring value.
        candidates = [round(hidden / base, d) for d in range(1, 8)] + [(hidden + 0.5) / base]
        for multiplier in candidates:
            if multiplier > 0 and reproduces(multiple_of, multiplier):
                return multiple_of, multiplier
    raise ValueError(f"no multiple_of/ffn_dim_multiplier gives an FFN hidden size of {hidden} for dim {dim}")


def _rope_from_hf(config: dict, path: Path) -> dict:
    """params.json's rope fields from an HF config in either the transformers 5 or the older form."""
    if isinstance(config.get("rope_parameters"), dict):  # transformers >= 5
        rope = dict(config["rope_parameters"])
    else:  # older: rope_scaling (or null) plus a top-level rope_theta
        rope = dict(config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))  # 10000: LlamaConfig's default
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    params: dict = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if rope_type == "default":
        params["use_scaled_rope"] = False
        return params
    if rope_type != "llama3":
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported; valid: 'default' or 'llama3'")
    expected = {"low_freq_factor": ROPE_LOW_FREQ_FACTOR, "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
                "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT}
    for name, value in expected.items():
        # The model implements Llama 3.1's scaling with these constants only.
        if rope.get(name) != value:
            raise ValueError(f"{path}: llama3 rope scaling needs {name} = {value}, got {rope.get(name)!r}")
    if not isinstance(rope.get("factor"), (int, float)) or not rope["factor"] > 0:
        raise ValueError(f"{path}: llama3 rope scaling needs a positive 'factor', got {rope.get('factor')!r}")
    params["use_scaled_rope"] = True
    if float(rope["factor"]) != 8.0:  # 8 is ModelArgs' (and Meta's) default; others are recorded
        params["rope_scaling_factor"] = float(rope["factor"])
    return params


def params_from_hf_config(config: dict, path: Path = Path("config.json")) -> dict:
    """Meta params.json dict for the architecture an HF Llama `config.json` describes (`path` names it in errors)."""
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{path}: model_type is {config['model_type']!r}; only 'llama' configs can be converted")
    for name, value in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(name, value) != value:
            raise ValueError(f"{path}: {name} = {config[name]!r} is not supported; Llama 3 uses {value!r}")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{path} is missing required field(s) {missing}")
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        raise ValueError(f"{path}: head_dim ({config.get('head_dim')}) must equal hidden_size / num_attention_heads "
                         f"({dim} / {n_heads}); the Meta layout has no separate head_dim")
    multiple_of, multiplier = ffn_params_for(dim, config["intermediate_size"])
    params = {
        "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads, "vocab_size": config["vocab_size"],
        "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
        "norm_eps": config.get("rms_norm_eps", 1e-6),  # 1e-6: LlamaConfig's default
        **_rope_from_hf(config, path),
    }
    ModelArgs.from_params(params)  # fails here, naming the field, if the shape is inconsistent
    return params


def _hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Which safetensors file of `hf_dir` holds each tensor: from model.safetensors.index.json, else every file."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {error!r}") from None
        files = {name: hf_dir / file for name, file in weight_map.items()}
        for file in sorted(set(files.values())):
            if not file.is_file():
                raise FileNotFoundError(f"{file} is listed in {index} but does not exist")
        return files
    paths = sorted(hf_dir.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors files in {hf_dir}; (PyTorch .bin checkpoints are not supported)")
    from safetensors import safe_open

    files = {}
    for file in paths:
        with safe_open(file, framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), file))
    return files


def convert_from_hf(hf_dir: Union[str, Path], dst: Union[str, Path], model_parallel_size: int = 1,
                    overwrite: bool = False) -> Path:
    """Write the HF Llama folder `hf_dir` (config.json + safetensors) as a Meta checkpoint of K shards in `dst`.

    Tensors keep their dtype and are read lazily, one output shard's slices at a time. The wq/wk rows are put
    back in Meta's rope order; tied embeddings become a separate output.weight, as Meta's checkpoints have it.
    """
    from safetensors import safe_open

    hf_dir, dst = Path(hf_dir), Path(dst)
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; an HF model folder holds config.json and *.safetensors")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None
    params = params_from_hf_config(config, config_path)
    args = ModelArgs.from_params(params)
    args.check_model_parallel_size(model_parallel_size)
    files = _hf_tensor_files(hf_dir)

    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in files
    names = {key: hf_key(key) for key in param_shapes(args)}
    if tied:
        names["output.weight"] = names["tok_embeddings.weight"]
    missing = sorted(set(names.values()) - set(files))
    # Old checkpoints store rope's inv_freq, which is recomputed from the config.
    unexpected = sorted(k for k in set(files) - set(names.values()) - {"lm_head.weight"}
                        if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"the safetensors files in {hf_dir} do not match {config_path}: missing tensors "
                         f"{missing[:10]}, unexpected tensors {unexpected[:10]}")

    with contextlib.ExitStack() as stack, output_dir(dst, overwrite) as partial:
        handles = {file: stack.enter_context(safe_open(file, framework="pt")) for file in set(files.values())}
        for part in range(model_parallel_size):
            shard = {}
            for key, shape in param_shapes(args).items():
                name = names[key]
                piece = handles[files[name]].get_slice(name)
                if tuple(piece.get_shape()) != shape:
                    raise ValueError(f"{files[name]}: {name} has shape {tuple(piece.get_shape())} but "
                                     f"{config_path} implies {shape}")
                dim = shard_dim(key)
                start, end = shard_range(key, args, part, model_parallel_size) if dim is not None else (0, None)
                tensor = piece[start:end] if dim == 0 else piece[:, start:end] if dim == 1 else piece[:]
                if key.endswith(("attention.wq.weight", "attention.wk.weight")):
                    # A shard holds whole heads, so each head is permuted on its own.
                    tensor = _rotate_half_to_interleaved(tensor, tensor.shape[0] // args.head_dim)
                shard[key] = _compact(tensor)
            torch.save(shard, partial / f"consolidated.{part:02d}.pth")
            del shard
        (partial / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        for tokenizer in (hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model"):
            if tokenizer.is_file():
                shutil.copyfile(tokenizer, partial / "tokenizer.model")
                break
        else:
            warnings.warn(f"{hf_dir} has no tokenizer.model (nor original/tokenizer.model), so {dst} has none; "
                          + _TOKENIZER_HINT, stacklevel=2)
        write_checklist(partial)
    return dst


def _parse_size(size: Union[int, str]) -> int:
    """Bytes in `size`: an int, or a string such as '5GB', '500MB' or '64KB' (powers of 1000, as HF counts)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    if isinstance(size, str):
        text = size.strip().upper()
        for unit, scale in units.items():
            if text.endswith(unit):
                try:
                    value = float(text[: -len(unit)])
                except ValueError:
                    break
                if value > 0:
                    return int(value * scale)
    raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '5GB' or '500MB', "
                     f"got {size!r}")


def _hf_tokenizer(tokenizer_model: Path, args: ModelArgs):
    """A transformers fast tokenizer equivalent to llama.tokenizer.Tokenizer on `tokenizer_model`, or None (warned)."""
    from llama.tokenizer import PRETOKENIZE_PATTERN, read_bpe_ranks, special_token_names

    ranks = read_bpe_ranks(tokenizer_model)
    specials = special_token_names()
    if len(ranks) + len(specials) != args.vocab_size:
        warnings.warn(f"{tokenizer_model} has {len(ranks) + len(specials)} tokens but the model's vocab_size is "
                      f"{args.vocab_size}; no HF tokenizer is written", stacklevel=3)
        return None
    try:
        from tokenizers import processors
        from transformers import PreTrainedTokenizerFast
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError as error:
        warnings.warn(f"cannot build an HF tokenizer ({error}); see README, 'Checkpoints'", stacklevel=3)
        return None

    class _Converter(TikTokenConverter):
        # Our reader instead of tiktoken's, which caches files by path (see read_bpe_ranks).
        @staticmethod
        def load_tiktoken_bpe(path: str) -> dict[bytes, int]:
            return read_bpe_ranks(Path(path))

    backend = _Converter(str(tokenizer_model), pattern=PRETOKENIZE_PATTERN, extra_special_tokens=specials).converted()
    # Like HF's Llama 3 tokenizers, encode() starts with <|begin_of_text|> unless add_special_tokens=False.
    bos = specials[0]
    backend.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                      special_tokens=[(bos, len(ranks))]),
    ])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=specials[1],
                                   model_max_length=131072 if args.use_scaled_rope else 8192)


def convert_to_hf(src: Union[str, Path], dst: Union[str, Path], max_shard_size: Union[int, str] = "5GB",
                  overwrite: bool = False, tokenizer: bool = True) -> Path:
    """Write the Meta checkpoint `src` (any shard count) as an HF `LlamaForCausalLM` folder in `dst`.

    config.json plus safetensors files of at most `max_shard_size` each (with model.safetensors.index.json when
    there are several), built one file at a time. With `tokenizer` and a matching `src/tokenizer.model`, also an
    HF fast tokenizer (tokenizer.json, tokenizer_config.json) and the original file under original/.
    """
    src, dst = Path(src), Path(dst)
    limit = _parse_size(max_shard_size)
    args = ModelArgs.from_params(read_params(src))
    paths = shard_paths(src)
    _check_world_size(src, args, len(paths), 1)
    read_shard = _shard_reader(paths, args)

    def full(key: str) -> torch.Tensor:
        return gather_shard(read_shard, len(paths), key, args, 0, 1)

    dtype = read_shard(0)["tok_embeddings.weight"].dtype
    # Llama 3.2 1B/3B share the embedding with the output layer; Meta stores it twice, HF once.
    tied = torch.equal(full("tok_embeddings.weight"), full("output.weight"))
    shapes = {key: shape for key, shape in param_shapes(args).items() if not (tied and key == "output.weight")}
    # Group tensors into files of at most `limit` bytes (a single larger tensor gets a file of its own).
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes

    from safetensors.torch import save_file

    with output_dir(dst, overwrite) as partial:
        weight_map = {}
        for i, keys in enumerate(groups):
            file = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            tensors = {hf_key(key): _meta_to_hf_tensor(key, full(key), args).contiguous() for key in keys}
            save_file(tensors, partial / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, file))
            del tensors
        if len(groups) > 1:
            total = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

        dtype_name = str(dtype).removeprefix("torch.")
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf_config_dict(args),
                  "tie_word_embeddings": tied, "dtype": dtype_name, "torch_dtype": dtype_name}  # new and old name
        if args.vocab_size > max(_EOS_IDS):  # the Llama 3 tokenizer's ids; small test vocabularies lack them
            config.update(bos_token_id=_BOS_ID, eos_token_id=_EOS_IDS)
        (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        tokenizer_model = src / "tokenizer.model"
        if not tokenizer_model.is_file():
            warnings.warn(f"{src} has no tokenizer.model, so {dst} has no tokenizer; {_TOKENIZER_HINT}", stacklevel=2)
        elif tokenizer:
            hf_tokenizer = _hf_tokenizer(tokenizer_model, args)
            if hf_tokenizer is not None:
                hf_tokenizer.save_pretrained(partial)
            # Where Meta's HF repositories keep it, and where from_hf looks for it.
            (partial / "original").mkdir()
            shutil.copyfile(tokenizer_model, partial / "original" / "tokenizer.model")
    return dst


def reshard(src: str, dst: str, model_parallel_size: int, overwrite: bool = False) -> str:
    """Rewrite checkpoint SRC as MODEL_PARALLEL_SIZE shards in DST (a divisor or multiple of its shard count)."""
    return str(reshard_checkpoint(Path(src), Path(dst), model_parallel_size, overwrite))


def random(
    dst: str,
    preset: str = "tiny",
    model_parallel_size: int = 1,
    seed: int = 0,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> str:
    """Write a random-weight checkpoint in Meta's layout to DST (preset: tiny, 1B, 3B, 8B or 70B)."""
    return str(write_random_checkpoint(dst, preset, model_parallel_size, seed, dtype, overwrite))


def from_hf(hf_dir: str, dst: str, model_parallel_size: int = 1, overwrite: bool = False) -> str:
    """Convert the HF Llama folder HF_DIR (config.json + safetensors) to a Meta checkpoint of K shards in DST."""
    return str(convert_from_hf(hf_dir, dst, model_parallel_size, overwrite))


def to_hf(src: str, dst: str, max_shard_size: str = "5GB", overwrite: bool = False) -> str:
    """Convert the Meta checkpoint SRC to an HF LlamaForCausalLM folder DST (config.json, safetensors, tokenizer)."""
    return str(convert_to_hf(src, dst, max_shard_size, overwrite))


# Subcommands of `python -m llama.checkpoint`; add new ones here.
COMMANDS = {"random": random, "reshard": reshard, "from_hf": from_hf, "to_hf": to_hf}

if __name__ == "__main__":
    try:
        fire.Fire(COMMANDS)
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: the message says it all
        sys.exit(f"error: {error}")
