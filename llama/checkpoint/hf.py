"""Hugging Face `LlamaForCausalLM` folders ⇄ Meta checkpoints (`python -m llama.checkpoint from_hf / to_hf`).

The two layouts hold the same tensors under other names, except that wq and wk rows are ordered for another rope
convention (see `_interleaved_to_rotate_half`). transformers, safetensors and tokenizers are imported only by the
functions that need them, so importing this module costs neither.
"""

import contextlib
import json
import math
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Union

import torch

from llama.args import ModelArgs
from llama.bpe import SIDECAR_NAME
from llama.checkpoint.hf_config import hf_config_dict, params_from_hf_config
from llama.checkpoint.layout import check_model_parallel_size, gather_shard, param_shapes, shard_dim, shard_range
from llama.checkpoint.load import check_world_size, read_params, shard_paths, shard_reader
from llama.checkpoint.write import check_destination, output_dir, write_checklist, write_meta_checkpoint

# The Llama 3 tokenizer's ids, written into config.json when the vocabulary has them. A base model ends text with
# <|end_of_text|>; instruct models end turns with <|eom_id|> or <|eot_id|>. A checkpoint does not say which it
# is, so all three are listed, as our own generation does.
_BOS_ID, _EOS_IDS = 128000, [128001, 128008, 128009]
_TOKENIZER_HINT = ("copy a Llama 3 tokenizer.model into it (from Meta's download, the HF repository's original/ "
                   "folder, or the llama-models package: llama_models/llama3/tokenizer.model)")

# safetensors' names of the floating-point dtypes that torch loads.
_FLOAT_DTYPES = ("BF16", "F16", "F32", "F64", "F8_E4M3", "F8_E5M2")

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


def _interleaved_to_rotate_half(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Meta rotates dim pairs (2i, 2i+1) of a head; HF rotates (i, i + head_dim/2). Reorder each head's
    # output rows from [pair0.a, pair0.b, pair1.a, ...] to [all .a, all .b].
    rows, cols = weight.shape
    return weight.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _rotate_half_to_interleaved(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    # Inverse of _interleaved_to_rotate_half: each head's rows [all .a, all .b] back to [pair0.a, pair0.b, ...].
    rows, cols = weight.shape
    return weight.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


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


# ---------------------------------------------------------------------------------------------------------------
# HF -> Meta
# ---------------------------------------------------------------------------------------------------------------


def _read_hf_config(hf_dir: Path) -> tuple[dict, Path]:
    config_path = hf_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; an HF model folder holds config.json and *.safetensors")
    try:
        return json.loads(config_path.read_text()), config_path
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path} is not valid JSON: {error}") from None


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    """safetensors' lazy reader of `file`; ValueError naming it if it is truncated or not a safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file} is truncated or not a safetensors file ({error})") from None
    with handle:
        yield handle


def _read_weight_map(index: Path, hf_dir: Path) -> dict[str, Path]:
    """The files model.safetensors.index.json names for each tensor, checked to be files of `hf_dir`."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise ValueError(f"{index} is not a safetensors index (JSON with a 'weight_map'): {error!r}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index}: weight_map must map tensor names to file names, got {type(weight_map).__name__}")
    for file in set(weight_map.values()):
        if Path(file).name != file or file in ("", ".", ".."):  # never read outside the folder
            raise ValueError(f"{index}: weight_map: {file!r} is not a file name in {hf_dir}")
        if not (hf_dir / file).is_file():
            raise FileNotFoundError(f"{hf_dir / file} is listed in {index} but does not exist")
    return {name: hf_dir / file for name, file in weight_map.items()}


def _hf_tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Which safetensors file of `hf_dir` holds each tensor: from model.safetensors.index.json, else every file."""
    index = hf_dir / "model.safetensors.index.json"
    listed = _read_weight_map(index, hf_dir) if index.is_file() else None
    paths = sorted(set(listed.values())) if listed is not None else sorted(hf_dir.glob("*.safetensors"))
    if not paths:
        raise FileNotFoundError(f"no *.safetensors files in {hf_dir}; (PyTorch .bin checkpoints are not supported)")
    files = {}
    for file in paths:
        with _open_safetensors(file) as f:
            files.update(dict.fromkeys(f.keys(), file))
    if listed is None:
        return files
    wrong = sorted(name for name, file in listed.items() if files.get(name) != file)
    if wrong:
        raise ValueError(f"{index} lists tensors that are not in the files it names: {wrong[:10]}")
    return listed


def _check_hf_tensors(handles: dict[Path, Any], files: dict[str, Path], names: dict, args: ModelArgs,
                      config_path: Path) -> None:
    """Raise ValueError, naming the file and tensor, unless each tensor read has the shape `args` implies and a
    floating-point dtype; only the files' headers are read."""
    for key, shape in param_shapes(args).items():
        name = names[key]
        piece = handles[files[name]].get_slice(name)
        if piece.get_dtype() not in _FLOAT_DTYPES:
            raise ValueError(f"{files[name]}: {name} has dtype {piece.get_dtype()}; weights must be floating point "
                             f"({', '.join(_FLOAT_DTYPES)})")
        if tuple(piece.get_shape()) != shape:
            raise ValueError(f"{files[name]}: {name} has shape {tuple(piece.get_shape())} but "
                             f"{config_path} implies {shape}")


def _hf_names(args: ModelArgs, config: dict, files: dict[str, Path], hf_dir: Path, config_path: Path) -> dict:
    """The HF tensor each Meta key is read from, checked against the tensors the folder holds."""
    tied = config.get("tie_word_embeddings", False) or "lm_head.weight" not in files
    names = {key: hf_key(key) for key in param_shapes(args)}
    if tied:  # Meta's checkpoints store the tied embedding twice, as a separate output.weight
        names["output.weight"] = names["tok_embeddings.weight"]
    missing = sorted(set(names.values()) - set(files))
    # Old checkpoints store rope's inv_freq, which is recomputed from the config.
    unexpected = sorted(k for k in set(files) - set(names.values()) - {"lm_head.weight"}
                        if not k.endswith("rotary_emb.inv_freq"))
    if missing or unexpected:
        raise ValueError(f"the safetensors files in {hf_dir} do not match {config_path}: missing tensors "
                         f"{missing[:10]}, unexpected tensors {unexpected[:10]}")
    return names


def _meta_shard_from_hf(
    slice_of: Callable[[str], Any], names: dict, args: ModelArgs, part: int, parts: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Shard `part` of `parts` of the Meta checkpoint, read from lazy safetensors slices (`slice_of(name)`), whose
    shapes were checked (`_check_hf_tensors`)."""
    for key in param_shapes(args):
        piece = slice_of(names[key])
        dim = shard_dim(key)
        start, end = shard_range(key, args, part, parts) if dim is not None else (0, None)
        tensor = piece[start:end] if dim == 0 else piece[:, start:end] if dim == 1 else piece[:]
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            # A shard holds whole heads, so each head is permuted on its own.
            tensor = _rotate_half_to_interleaved(tensor, tensor.shape[0] // args.head_dim)
        yield key, tensor


def convert_from_hf(hf_dir: Union[str, Path], dst: Union[str, Path], model_parallel_size: int = 1,
                    overwrite: bool = False) -> Path:
    """Write the HF Llama folder `hf_dir` (config.json + safetensors) as a Meta checkpoint of K shards in `dst`.

    Tensors keep their dtype and are read lazily, one output shard's slices at a time. The wq/wk rows are put
    back in Meta's rope order; tied embeddings become a separate output.weight, as Meta's checkpoints have it.
    """
    hf_dir, dst = Path(hf_dir), Path(dst)
    check_destination(dst, overwrite, sources=[hf_dir])
    config, config_path = _read_hf_config(hf_dir)
    params = params_from_hf_config(config, config_path)
    args = ModelArgs.from_params(params)
    check_model_parallel_size(args, model_parallel_size)
    files = _hf_tensor_files(hf_dir)
    names = _hf_names(args, config, files, hf_dir, config_path)
    candidates = (hf_dir / "tokenizer.model", hf_dir / "original" / "tokenizer.model")
    tokenizer = next((path for path in candidates if path.is_file()), None)
    no_tokenizer = (f"{hf_dir} has no tokenizer.model (nor original/tokenizer.model), so {dst} has none; "
                    + _TOKENIZER_HINT)

    with contextlib.ExitStack() as stack:
        handles = {file: stack.enter_context(_open_safetensors(file)) for file in set(files.values())}
        _check_hf_tensors(handles, files, names, args, config_path)

        def shard_tensors(part: int) -> Iterator[tuple[str, torch.Tensor]]:
            slice_of = lambda name: handles[files[name]].get_slice(name)  # noqa: E731
            return _meta_shard_from_hf(slice_of, names, args, part, model_parallel_size)

        return write_meta_checkpoint(dst, params, model_parallel_size, shard_tensors, tokenizer, overwrite,
                                     no_tokenizer_warning=no_tokenizer, sources=[hf_dir])


# ---------------------------------------------------------------------------------------------------------------
# Meta -> HF
# ---------------------------------------------------------------------------------------------------------------


def parse_size(size: Union[int, str]) -> int:
    """Bytes in `size`: an int, or a string such as '5GB', '500MB', '64KB' or '1000' (powers of 1000, as HF counts)."""
    units = {"GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1, "": 1}
    if isinstance(size, str):
        text = size.strip().upper()
        unit = next(unit for unit in units if text.endswith(unit))  # "" ends every text
        try:
            value = float(text[: len(text) - len(unit)])
        except ValueError:
            value = math.nan
        size = int(value * units[unit]) if math.isfinite(value) else size
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    raise ValueError(f"max_shard_size must be a positive number of bytes or a size like '5GB' or '500MB', "
                     f"got {size!r}")


def _file_groups(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, limit: int) -> list[list[str]]:
    """Tensors grouped, in order, into files of at most `limit` bytes (a larger tensor gets a file of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * dtype.itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes
    return groups


def _write_safetensors(folder: Path, groups: list[list[str]], hf_tensor: Callable[[str], torch.Tensor],
                       total_bytes: int) -> None:
    """One safetensors file per group, made one at a time, and the index HF reads when there are several."""
    from safetensors.torch import save_file

    weight_map = {}
    for i, keys in enumerate(groups):
        file = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {hf_key(key): hf_tensor(key).contiguous() for key in keys}
        save_file(tensors, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    if len(groups) > 1:
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _hf_config_json(args: ModelArgs, dtype: torch.dtype, tied: bool) -> dict:
    dtype_name = str(dtype).removeprefix("torch.")
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf_config_dict(args),
              "tie_word_embeddings": tied, "dtype": dtype_name, "torch_dtype": dtype_name}  # new and old name
    if args.vocab_size > max(_EOS_IDS):  # the Llama 3 tokenizer's ids; small test vocabularies lack them
        config.update(bos_token_id=_BOS_ID, eos_token_id=_EOS_IDS)
    return config


def _hf_tokenizer(tokenizer_model: Path, args: ModelArgs):
    """A transformers fast tokenizer equivalent to llama.tokenizer.Tokenizer on `tokenizer_model`, or None (warned)."""
    from llama.tokenizer import PRETOKENIZE_PATTERN, read_bpe_ranks, special_token_names

    if tokenizer_model.with_name(SIDECAR_NAME).is_file():
        warnings.warn(f"{tokenizer_model} is a vocabulary other than Llama 3's (it has a {SIDECAR_NAME}); no HF "
                      "tokenizer is written", stacklevel=3)
        return None
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
    limit = parse_size(max_shard_size)
    check_destination(dst, overwrite, sources=[src])
    args = ModelArgs.from_params(read_params(src))
    if args.quantization is not None:
        raise ValueError(f"{src} stores its weights as GGUF blocks (params.json \"quantization\": "
                         f"{args.quantization!r}), which HF safetensors have no form for; import the GGUF file again "
                         "with --dequantize and convert that")
    paths = shard_paths(src)
    read_shard = shard_reader(paths, args)
    read_shard(0)  # params.json checked against the files before anything is sized by it
    check_world_size(src, args, len(paths), 1)

    def full(key: str) -> torch.Tensor:
        return gather_shard(read_shard, len(paths), key, args, 0, 1)

    dtype = read_shard(0)["tok_embeddings.weight"].dtype
    # Llama 3.2 1B/3B share the embedding with the output layer; Meta stores it twice, HF once.
    tied = torch.equal(full("tok_embeddings.weight"), full("output.weight"))
    shapes = {key: shape for key, shape in param_shapes(args).items() if not (tied and key == "output.weight")}
    total_bytes = sum(math.prod(shape) for shape in shapes.values()) * dtype.itemsize
    tokenizer_model = src / "tokenizer.model"
    with output_dir(dst, overwrite, sources=[src]) as partial:
        _write_safetensors(partial, _file_groups(shapes, dtype, limit),
                           lambda key: _meta_to_hf_tensor(key, full(key), args), total_bytes)
        (partial / "config.json").write_text(json.dumps(_hf_config_json(args, dtype, tied), indent=2) + "\n")
        if not tokenizer_model.is_file():
            warnings.warn(f"{src} has no tokenizer.model, so {dst} has no tokenizer; {_TOKENIZER_HINT}", stacklevel=2)
        elif tokenizer:
            hf_tokenizer = _hf_tokenizer(tokenizer_model, args)
            if hf_tokenizer is not None:
                hf_tokenizer.save_pretrained(partial)
            # Where Meta's HF repositories keep it, and where from_hf looks for it.
            (partial / "original").mkdir()
            shutil.copyfile(tokenizer_model, partial / "original" / "tokenizer.model")
            if tokenizer_model.with_name(SIDECAR_NAME).is_file():
                shutil.copyfile(tokenizer_model.with_name(SIDECAR_NAME), partial / "original" / SIDECAR_NAME)
        write_checklist(partial)
    return dst
