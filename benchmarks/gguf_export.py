"""Write a one-shard Meta checkpoint with Llama 3's vocabulary as a GGUF file, so that llama.cpp can run the same
weights in the benchmarks (the library's import is `python -m llama.checkpoint from_gguf`; this is its inverse,
kept here because only the benchmarks need it).

    python benchmarks/gguf_export.py CKPT_DIR OUT.gguf [--tensor_type F16|BF16|Q8_0|Q4_0|F32]

Tensors keep Meta's layout: llama.cpp stores q/k rows in the same interleaved rope order. 2-D weights get
`--tensor_type` (the embedding table too), norms float32, and Llama 3.1 rope scaling travels as llama.cpp's
`rope_freqs.weight` (per-frequency divisors). The vocabulary goes in GPT-2's byte-level strings with merges
recovered from tiktoken's ranks, since llama.cpp's BPE needs an explicit merge list. Needs the `gguf` package.
"""

import argparse
from pathlib import Path

import torch

from llama.args import ModelArgs
from llama.checkpoint.gguf import gguf_name, gpt2_byte_of_char
from llama.checkpoint.load import load_shard, read_params, shard_paths
from llama.model import rope_frequencies
from llama.tokenizer import Tokenizer

TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0")


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list that reproduces tiktoken's ranks: for each token of two or more bytes, in rank order, the
    two parts that byte-pair merging with only lower-ranked tokens leaves of it."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [token[i : i + 1] for i in range(len(token))]
        while len(parts) > 2:
            pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            best, i = min(pairs)
            if best >= rank:
                break
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
    return merges


def _add_vocabulary(writer, tokenizer: Tokenizer) -> None:
    char_of_byte = {byte: char for char, byte in gpt2_byte_of_char().items()}
    text = lambda data: "".join(char_of_byte[b] for b in data)  # noqa: E731
    ranks = {tokenizer.model.decode_single_token_bytes(i): i for i in range(tokenizer.n_words - 256)}
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list([text(token) for token in ranks] + specials)
    writer.add_token_types([1] * len(ranks) + [3] * len(specials))  # normal, control
    writer.add_token_merges([f"{text(a)} {text(b)}" for a, b in recover_merges(ranks)])
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)


def _add_shape(writer, args: ModelArgs) -> None:
    writer.add_context_length(131072 if args.use_scaled_rope else 8192)
    writer.add_block_count(args.n_layers)
    writer.add_embedding_length(args.dim)
    writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_rope_dimension_count(args.head_dim)


def export_gguf(ckpt_dir: Path, out: Path, tensor_type: str = "F16") -> Path:
    """Write the checkpoint in `ckpt_dir` (one shard, Llama 3's vocabulary) as the GGUF file `out`."""
    import gguf
    from gguf.quants import quantize

    if tensor_type not in TENSOR_TYPES:
        raise ValueError(f"tensor_type must be one of {', '.join(TENSOR_TYPES)}, got {tensor_type!r}")
    paths = shard_paths(ckpt_dir)
    if len(paths) != 1:
        raise ValueError(f"{ckpt_dir} has {len(paths)} shards; reshard it to one first (python -m llama.checkpoint "
                         "reshard ... --model_parallel_size 1)")
    tokenizer = Tokenizer(ckpt_dir / "tokenizer.model")
    if tokenizer.info is not None:
        raise ValueError(f"{ckpt_dir} does not have Llama 3's vocabulary; only that one is exported")
    params = read_params(ckpt_dir)
    args = ModelArgs.from_params(params)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(out, "llama")
    writer.add_name(ckpt_dir.name)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{tensor_type}" if tensor_type != "F32" else "ALL_F32"])
    _add_shape(writer, args)
    _add_vocabulary(writer, tokenizer)
    if args.use_scaled_rope:
        plain = rope_frequencies(ModelArgs.from_params({**params, "use_scaled_rope": False}))
        writer.add_tensor("rope_freqs.weight", (plain / rope_frequencies(args)).numpy())
    for key, tensor in load_shard(paths[0]).items():
        array = tensor.float().numpy()
        if tensor.dim() == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(key), array)
        else:
            writer.add_tensor(gguf_name(key), quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tensor_type", default="F16", choices=TENSOR_TYPES)
    options = parser.parse_args()
    print(export_gguf(options.ckpt_dir, options.out, options.tensor_type))


if __name__ == "__main__":
    main()
