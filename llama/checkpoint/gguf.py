"""GGUF files of the `llama` architecture → checkpoints (`python -m llama.checkpoint from_gguf`).

A GGUF file holds the model's shape as metadata (`llama.*` keys), its tensors under llama.cpp's names, possibly
quantized, and its vocabulary as a list of GPT-2 byte-level strings. Quantized weights keep GGUF's blocks
(`llama.checkpoint.gguf_blocks`; a checkpoint of GGUF blocks, see `llama.checkpoint.layout`); with `dequantize`,
every tensor is dequantized to float32 by the `gguf` package and cast to the chosen dtype (Meta's layout). llama.cpp
stores wq/wk rows in Meta's interleaved rope order, so they are copied as they are. Llama 3.1 rope scaling travels
as a `rope_freqs.weight` tensor of per-frequency factors, from which `use_scaled_rope` and the factor are recovered.
A byte-level BPE vocabulary other than Llama 3's (a supported `tokenizer.ggml.pre`, e.g. SmolLM2's "smollm") becomes
tokenizer.model plus a sidecar (llama.bpe). `gguf` (and numpy) are imported only by the functions that need them.
"""

import base64
import dataclasses
import json
import math
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional, Union

import torch

from llama.args import GGUF_BLOCKS, ModelArgs
from llama.bpe import END_OF_TURN_TOKENS, PRETOKENIZE_PATTERNS, SIDECAR_FORMAT, SIDECAR_NAME
from llama.checkpoint.gguf_blocks import BLOCK_TYPES, ImportReport, read_weight
from llama.checkpoint.hf_config import ffn_params_for
from llama.checkpoint.layout import block_state, check_model_parallel_size, param_shapes, take_shard
from llama.checkpoint.write import check_destination, write_meta_checkpoint
from llama.devices import parse_dtype
from llama.model import rope_frequencies
from llama.sampling import check_bool
from llama.tokenizer import special_token_names

_LLAMA3_RANKS = 128000  # Llama 3's ordinary (BPE) tokens; its 256 special tokens follow them
_INSTALL_HINT = 'reading GGUF files needs the gguf package: pip install -e ".[gguf]"'
_INT_TYPES = {"UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "UINT64", "INT64"}
_FLOAT_TYPES = {"FLOAT32", "FLOAT64"}

# llama.cpp's tensor names of a layer, keyed by the Meta names, and of the tensors outside the layers.
_GGUF_LAYER_NAMES = {
    "attention.wq.weight": "attn_q", "attention.wk.weight": "attn_k", "attention.wv.weight": "attn_v",
    "attention.wo.weight": "attn_output", "feed_forward.w1.weight": "ffn_gate", "feed_forward.w3.weight": "ffn_up",
    "feed_forward.w2.weight": "ffn_down", "attention_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm",
}
_GGUF_TOP_NAMES = {"tok_embeddings.weight": "token_embd", "norm.weight": "output_norm", "output.weight": "output"}
_ROPE_FREQS = "rope_freqs.weight"


def gguf_name(key: str) -> str:
    """llama.cpp's name of the tensor that the Meta state-dict key `key` names."""
    if key in _GGUF_TOP_NAMES:
        return _GGUF_TOP_NAMES[key] + ".weight"
    parts = key.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in _GGUF_LAYER_NAMES:
        return f"blk.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.weight"
    raise ValueError(f"unknown Meta state-dict key {key!r}")


def gpt2_byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, read backwards: the byte each character stands for.

    Printable bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the 68 others, in byte order, are
    written as the characters 256, 257, ... .
    """
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    byte_of, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            byte_of[chr(byte)] = byte
        else:
            byte_of[chr(256 + shifted)] = byte
            shifted += 1
    return byte_of


def _open_reader(file: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RuntimeError(_INSTALL_HINT) from None
    if not file.is_file():
        raise FileNotFoundError(f"GGUF file not found: {file}")
    try:
        return GGUFReader(file, "r")
    except (ValueError, OSError, IndexError, KeyError, TypeError) as error:  # what a damaged header raises
        raise ValueError(f"{file} is truncated or not a GGUF file ({error})") from None


def _value(reader: Any, key: str, file: Path, kind: type, default: Any = None) -> Any:
    """The metadata value `key` as an int, float or str (`kind`); `default` when absent, or ValueError if None."""
    import numpy as np

    field = reader.fields.get(key)
    if field is None:
        if default is None:
            raise ValueError(f"{file} lacks the metadata key {key}; is it a GGUF file of a Llama model?")
        return default
    allowed = {int: _INT_TYPES, float: _INT_TYPES | _FLOAT_TYPES, str: {"STRING"}}[kind]
    types = [t.name for t in field.types]
    if len(types) != 1 or types[0] not in allowed:
        raise ValueError(f"{file}: metadata {key} must be a {kind.__name__}, got a {'/'.join(types) or 'nothing'}")
    part = field.parts[field.data[0]]
    if kind is str:
        return bytes(part).decode("utf-8", errors="replace")
    if types[0] == "FLOAT32":  # the shortest decimal of the float32, so 1e-05 stays 1e-05
        return float(str(np.float32(part[0])))
    return kind(part[0].item())


def _tokens(reader: Any, file: Path) -> list[str]:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None or [t.name for t in field.types] != ["ARRAY", "STRING"]:
        raise ValueError(f"{file} has no vocabulary (tokenizer.ggml.tokens, an array of strings)")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def _check_kind(reader: Any, file: Path) -> None:
    """Refuse, naming what the file holds, anything but a Llama model with Llama 3's tokenizer."""
    arch = _value(reader, "general.architecture", file, str)
    if arch != "llama":
        raise ValueError(f"{file}: general.architecture is {arch!r}; only 'llama' GGUF files can be imported")
    if _value(reader, "llama.expert_count", file, int, 0) > 0:
        raise ValueError(f"{file} is a mixture-of-experts model (llama.expert_count > 0), which is not supported")
    model = _value(reader, "tokenizer.ggml.model", file, str)
    if model != "gpt2":
        raise ValueError(f"{file}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE, as Llama 3's) "
                         "vocabularies can be imported")
    pre = _value(reader, "tokenizer.ggml.pre", file, str, "(none)")
    if pre != "llama-bpe" and pre not in PRETOKENIZE_PATTERNS:
        known = ", ".join(repr(name) for name in ["llama-bpe", *PRETOKENIZE_PATTERNS])
        raise ValueError(f"{file}: tokenizer.ggml.pre is {pre!r}; its pre-tokenizer is not supported yet (only "
                         f"{known} are)")
    scaling = _value(reader, "llama.rope.scaling.type", file, str, "none")
    if scaling != "none":
        raise ValueError(f"{file}: llama.rope.scaling.type is {scaling!r}; only Llama 3.1 scaling (a "
                         f"{_ROPE_FREQS} tensor) is supported")


def llama3_ranks_file(tokens: list[str], file: Union[str, Path]) -> bytes:
    """Llama 3's `tokenizer.model` (tiktoken's `base64(token bytes) rank` lines) from a GGUF token list.

    The list must be Llama 3's: 128000 distinct byte-level tokens covering all 256 bytes, then its special tokens.
    """
    specials = special_token_names()
    if len(tokens) != _LLAMA3_RANKS + len(specials) or tokens[_LLAMA3_RANKS:] != specials:
        raise ValueError(f"{file}: the vocabulary ({len(tokens)} tokens) is not Llama 3's: 128000 tokens followed "
                         f"by its {len(specials)} special tokens ({specials[0]}, ...)")
    byte_of = gpt2_byte_of_char()
    lines, seen = [], set()
    for rank, token in enumerate(tokens[:_LLAMA3_RANKS]):
        try:
            data = bytes(byte_of[char] for char in token)
        except KeyError:
            raise ValueError(f"{file}: token {rank} ({token!r}) is not a GPT-2 byte-level string") from None
        if not data or data in seen:
            raise ValueError(f"{file}: token {rank} ({token!r}) is empty or repeats an earlier token")
        seen.add(data)
        lines.append(base64.b64encode(data) + b" " + str(rank).encode())
    if not all(bytes([byte]) in seen for byte in range(256)):
        raise ValueError(f"{file}: the vocabulary lacks some single-byte tokens, so it is not a byte-level BPE one")
    return b"\n".join(lines) + b"\n"


def _token_bytes(token: str, token_id: int, file: Union[str, Path], byte_of: dict[str, int]) -> bytes:
    try:
        data = bytes(byte_of[char] for char in token)
    except KeyError:
        raise ValueError(f"{file}: token {token_id} ({token!r}) is not a GPT-2 byte-level string") from None
    if not data:
        raise ValueError(f"{file}: token {token_id} is empty")
    return data


def _string_array(reader: Any, key: str, file: Path) -> list[str]:
    field = reader.fields.get(key)
    if field is None or [t.name for t in field.types] != ["ARRAY", "STRING"]:
        raise ValueError(f"{file} lacks {key}, an array of strings")
    return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]


def bpe_vocabulary(reader: Any, tokens: list[str], file: Path) -> tuple[bytes, dict]:
    """`tokenizer.model` (`base64(token bytes) id` lines for the ordinary tokens) and its sidecar (see llama.bpe)
    for a GPT-2-style byte-level BPE vocabulary other than Llama 3's. Tokens of type CONTROL (3) or USER_DEFINED
    (4) are the special tokens."""
    field = reader.fields.get("tokenizer.ggml.token_type")
    types = [int(field.parts[i][0]) for i in field.data] if field is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{file}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    byte_of, lines, ids_of, specials, seen = gpt2_byte_of_char(), [], {}, {}, set()
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (3, 4):
            specials[token] = token_id
            continue
        data = _token_bytes(token, token_id, file, byte_of)
        if data in seen:
            raise ValueError(f"{file}: token {token_id} ({token!r}) repeats an earlier token")
        ids_of[token] = token_id
        seen.add(data)
        lines.append(base64.b64encode(data) + b" " + str(token_id).encode())
    merges = []
    for priority, merge in enumerate(_string_array(reader, "tokenizer.ggml.merges", file)):
        parts = merge.split(" ")
        if len(parts) != 2 or parts[0] not in ids_of or parts[1] not in ids_of or "".join(parts) not in ids_of:
            raise ValueError(f"{file}: merge {priority} ({merge!r}) is not two tokens that make a token")
        merges.append([ids_of[parts[0]], ids_of[parts[1]]])
    pre = _value(reader, "tokenizer.ggml.pre", file, str)
    template = _value(reader, "tokenizer.chat_template", file, str, "")
    eos = _value(reader, "tokenizer.ggml.eos_token_id", file, int)
    info = {"format": SIDECAR_FORMAT, "pre": pre, "pattern": PRETOKENIZE_PATTERNS[pre], "n_words": len(tokens),
            "special_tokens": specials,
            "bos_id": _value(reader, "tokenizer.ggml.bos_token_id", file, int), "eos_id": eos,
            "stop_ids": sorted({eos} | {specials[name] for name in END_OF_TURN_TOKENS
                                        if name in specials and name in template}),
            "add_bos": bool(_add_bos(reader)), "chat_template": template, "merges": merges}
    return b"\n".join(lines) + b"\n", info


def _add_bos(reader: Any) -> bool:
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    return field is None or bool(field.parts[field.data[0]][0])


def rope_scaling_from_factors(factors: torch.Tensor, args: ModelArgs, file: Union[str, Path]) -> dict:
    """params.json's rope-scaling fields from llama.cpp's per-frequency factors (unscaled / scaled frequency).

    The factor is the largest value; the whole tensor must then be what Llama 3.1 scaling by it gives.
    """
    factors = factors.float().flatten()
    if factors.numel() != args.head_dim // 2:
        raise ValueError(f"{file}: {_ROPE_FREQS} has {factors.numel()} values; head_dim / 2 is {args.head_dim // 2}")
    if bool((factors == 1).all()):
        return {"use_scaled_rope": False}
    factor = float(factors.max())
    if math.isfinite(factor) and factor > 1:
        plain = rope_frequencies(dataclasses.replace(args, use_scaled_rope=False))
        scaled = rope_frequencies(dataclasses.replace(args, use_scaled_rope=True, rope_scaling_factor=factor))
        if torch.allclose(factors, plain / scaled, rtol=1e-4, atol=0):
            return {"use_scaled_rope": True, **({} if factor == 8.0 else {"rope_scaling_factor": factor})}
    shown = ", ".join(f"{v:.4g}" for v in factors.tolist()[:8])
    raise ValueError(f"{file}: {_ROPE_FREQS} ({shown}{', ...' if factors.numel() > 8 else ''}) is not what Llama "
                     f"3.1 rope scaling gives for rope_theta {args.rope_theta}; other rope scalings are not supported")


def _params(reader: Any, file: Path, n_tokens: int) -> dict:
    """params.json for the shape the metadata gives (rope scaling is added by the caller)."""
    value = lambda key, kind=int, default=None: _value(reader, f"llama.{key}", file, kind, default)  # noqa: E731
    dim, n_heads, hidden = value("embedding_length"), value("attention.head_count"), value("feed_forward_length")
    if value("vocab_size", default=n_tokens) != n_tokens:
        raise ValueError(f"{file}: llama.vocab_size ({value('vocab_size')}) differs from its {n_tokens} tokens")
    if n_heads <= 0 or dim % n_heads or value("rope.dimension_count", default=dim // n_heads) != dim // n_heads:
        raise ValueError(f"{file}: llama.rope.dimension_count must equal embedding_length / head_count "
                         f"({dim} / {n_heads}); the Meta layout has no separate head_dim")
    try:
        multiple_of, multiplier = ffn_params_for(dim, hidden)
        params = {"dim": dim, "n_layers": value("block_count"), "n_heads": n_heads,
                  "n_kv_heads": value("attention.head_count_kv", default=n_heads), "vocab_size": n_tokens,
                  "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
                  "norm_eps": value("attention.layer_norm_rms_epsilon", float),
                  "rope_theta": value("rope.freq_base", float, 10000.0)}
        ModelArgs.from_params(params)  # fails here, naming the field, if the shape is inconsistent
    except ValueError as error:
        raise ValueError(f"{file}: {error}" if str(file) not in str(error) else str(error)) from None
    return params


def _tensors_by_meta_key(reader: Any, args: ModelArgs, file: Path) -> dict[str, Any]:
    """The GGUF tensor each Meta key is read from, checked by name and shape (ne order reversed: rows, cols)."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    names = {key: gguf_name(key) for key in param_shapes(args)}
    if names["output.weight"] not in tensors:  # tied embeddings; Meta's checkpoints store them twice
        names["output.weight"] = names["tok_embeddings.weight"]
    missing = sorted(set(names.values()) - set(tensors))
    unexpected = sorted(set(tensors) - set(names.values()) - {_ROPE_FREQS})
    if missing or unexpected:
        raise ValueError(f"{file}: its tensors do not match its metadata: missing {missing[:10]}, unexpected "
                         f"{unexpected[:10]}")
    for key, shape in param_shapes(args).items():
        found = tuple(reversed([int(n) for n in tensors[names[key]].shape]))
        if found != shape:
            raise ValueError(f"{file}: {names[key]} has shape {found} (rows, columns) but the metadata implies {shape}")
    return {key: tensors[name] for key, name in names.items()}


def _read_tensor(tensor: Any, dtype: torch.dtype, file: Path) -> torch.Tensor:
    """A GGUF tensor, dequantized to float32 by the gguf package, as a (rows, cols) torch tensor of `dtype`."""
    import numpy as np
    from gguf.quants import dequantize

    try:
        array = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ValueError(f"{file}: {tensor.name} is of type {tensor.tensor_type.name}, which the installed gguf "
                         "package cannot dequantize") from None
    shape = tuple(reversed([int(n) for n in tensor.shape]))
    return torch.from_numpy(np.array(array, dtype=np.float32).reshape(shape)).to(dtype)


def convert_from_gguf(file: Union[str, Path], dst: Union[str, Path], model_parallel_size: int = 1,
                      dtype: Union[str, torch.dtype] = "bfloat16", overwrite: bool = False,
                      dequantize: bool = False) -> Path:
    """Write the GGUF file `file` (a Llama 3 model of llama.cpp's `llama` architecture) as a checkpoint of
    `model_parallel_size` shards in `dst`, with Llama 3's tokenizer.model or, for another byte-level BPE vocabulary
    (see llama.bpe), tokenizer.model plus its tokenizer_info.json.

    Quantized weights are stored as GGUF blocks (`llama.checkpoint.gguf_blocks` says which types are kept, which
    converted, at what measured error, printed on stderr one line per type) and floating-point ones in `dtype`:
    a checkpoint of GGUF blocks, which only this library loads. `dequantize=True` (and a file without block types)
    gives Meta's layout: every tensor dequantized and cast to `dtype` (a tied output layer stored twice, as Meta
    stores it).

    Everything is checked (metadata, vocabulary, tensor names and shapes) before anything is written; the
    tensors of one output shard at a time are in memory.
    """
    file, dst, dtype = Path(file), Path(dst), parse_dtype(dtype)
    check_bool("dequantize", dequantize)
    check_destination(dst, overwrite, sources=[file])
    reader = _open_reader(file)
    _check_kind(reader, file)
    tokens = _tokens(reader, file)
    sidecar = None
    if _value(reader, "tokenizer.ggml.pre", file, str) == "llama-bpe":
        ranks = llama3_ranks_file(tokens, file)
    else:
        ranks, sidecar = bpe_vocabulary(reader, tokens, file)
    params = _params(reader, file, len(tokens))
    factors = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    if factors is not None:
        params.update(rope_scaling_from_factors(_read_tensor(factors, torch.float32, file),
                                                ModelArgs.from_params(params), file))
    else:
        params["use_scaled_rope"] = False
    args = ModelArgs.from_params(params)
    check_model_parallel_size(args, model_parallel_size)
    tensors = _tensors_by_meta_key(reader, args, file)
    report = ImportReport(dtype)
    # A file without block types (F32, F16, BF16, ...) gives Meta's layout, as with `dequantize`.
    dequantize = dequantize or not any(tensor.tensor_type.name in BLOCK_TYPES for tensor in tensors.values())
    if not dequantize:
        params["quantization"] = GGUF_BLOCKS
        if tensors["output.weight"] is tensors["tok_embeddings.weight"]:  # tied: stored once, as the embedding
            del tensors["output.weight"]

    def shard_tensors(part: int) -> Iterator[tuple[str, torch.Tensor]]:
        for key, tensor in tensors.items():
            for stored, full in _stored(key, tensor, dtype, file, report if part == 0 else None, dequantize):
                yield stored, take_shard(full, key, args, part, model_parallel_size, stored)

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = Path(scratch) / "tokenizer.model"
        tokenizer.write_bytes(ranks)
        if sidecar is not None:  # copied along with tokenizer.model
            (Path(scratch) / SIDECAR_NAME).write_text(json.dumps(sidecar, ensure_ascii=False) + "\n")
        written = write_meta_checkpoint(dst, params, model_parallel_size, shard_tensors, tokenizer, overwrite,
                                        sources=[file])
    for line in report.lines():
        print(f"{file.name}: {line}", file=sys.stderr)
    return written


def _stored(key: str, tensor: Any, dtype: torch.dtype, file: Path, report: Optional[ImportReport],
            dequantize: bool) -> list[tuple[str, torch.Tensor]]:
    """The checkpoint tensors (stored key, full tensor) of the Meta key `key`, read from the GGUF tensor `tensor`;
    counted in `report` unless it is None."""
    if dequantize or len(tensor.shape) < 2:
        return [(key, _read_tensor(tensor, dtype, file))]
    try:
        weight = read_weight(tensor, dtype, report if report is not None else ImportReport(dtype))
    except NotImplementedError:
        raise ValueError(f"{file}: {tensor.name} is of type {tensor.tensor_type.name}, which the installed gguf "
                         "package cannot dequantize") from None
    return [(key, weight)] if isinstance(weight, torch.Tensor) else list(block_state(key, weight).items())
