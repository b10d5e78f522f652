"""Perplexity of a GGUF model on a fixed text, ours against llama.cpp's on the same file, tokens and positions.

    python benchmarks/perplexity.py [--gguf SmolLM2-135M-Instruct.Q4_1.gguf] [--tokens 4096] [--ctx 512]
        [--threads 2] [--work_dir ~/.cache/llama3-bench/perplexity] [--quantized]

The text is CPython's own documentation as it ships with the interpreter (`pydoc_data.topics`, what `help()`
prints): its topics in sorted order, joined by blank lines, cut to `--tokens` tokens of the model's vocabulary
(tokenized once, by our tokenizer, without BOS; printed: the Python version, the number of tokens llama.cpp's
tokenizer agrees on, and a hash of the ids). The ids are cut into chunks of `--ctx` tokens; a vocabulary that
starts prompts with BOS (Llama 3's) gets BOS in front of each chunk. Each chunk is evaluated from an empty cache,
and scored are the log-probabilities of every token of the chunk after its first (`--ctx - 1` per chunk), or with
`--second_half` only those of its second half, as llama.cpp's `llama-perplexity` scores. Perplexity is
exp(-mean log-probability), log-softmax taken in float64 of each implementation's float32 logits.

Rows: ours runs the checkpoint `python -m llama.checkpoint from_gguf` writes from the file (its Q8_0/Q4_0/Q4_1
blocks as they are, the rest in float32), computing in float32 (the block kernel rounds activations per 32 values);
llama.cpp (llama-cpp-python, `logits_all=True`) runs the file itself. With `--quantized`, the file is also written
by llama.cpp as F16 (its weights dequantized), and from that F16 file: ours in bfloat16 and with `quantize="int8"`
and `"int4"` (of those bfloat16 weights), and llama.cpp on the F16 file and on Q8_0 and Q4_0 files its own quantizer
makes from it (every 2-D tensor in that type, output and embedding included, as ours quantizes every linear layer;
and Q4_0 in llama.cpp's default mix, which keeps the output layer, or a tied embedding, in Q6_K); each quantized
row's increase is over its own implementation's 16-bit row.
"""

import argparse
import ctypes
import hashlib
import math
import platform
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from llama import Llama
from llama.checkpoint.gguf import convert_from_gguf
from llama.tokenizer import Tokenizer

DEFAULT_GGUF = Path.home() / ".cache/llama3-tests/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_WORK_DIR = Path.home() / ".cache/llama3-bench/perplexity"


def fixed_text(min_chars: int) -> str:
    """CPython's bundled help topics, sorted by name and joined by blank lines, until at least `min_chars`."""
    from pydoc_data.topics import topics

    parts, length = [], 0
    for name in sorted(topics):
        if length >= min_chars:
            break
        parts.append(topics[name].strip())
        length += len(parts[-1]) + 2
    return "\n\n".join(parts)


def chunks(tokenizer: Tokenizer, text: str, n_tokens: int, ctx: int) -> list[list[int]]:
    """`n_tokens` ids of `text` cut into chunks of `ctx` (BOS in front of each where the vocabulary adds it)."""
    ids = tokenizer.encode(text, bos=False, eos=False)
    if len(ids) < n_tokens:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than --tokens {n_tokens}")
    width = ctx - 1 if tokenizer.add_bos else ctx
    prefix = [tokenizer.bos_id] if tokenizer.add_bos else []
    return [prefix + ids[start : start + width] for start in range(0, n_tokens - width + 1, width)]


def perplexity(logits: Iterator[np.ndarray], token_chunks: list[list[int]], first_scored: int) -> float:
    """exp(-mean log p(token i | tokens < i)) over positions i >= first_scored of every chunk, given the logits
    (positions, vocab) of each chunk in turn."""
    total, count = 0.0, 0
    for chunk_logits, chunk in zip(logits, token_chunks):
        logprobs = torch.log_softmax(torch.from_numpy(chunk_logits).double(), dim=-1)
        targets = torch.tensor(chunk[first_scored:])
        total += logprobs[first_scored - 1 : len(chunk) - 1].gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return math.exp(-total / count)


def ours_logits(ckpt_dir: Path, token_chunks: list[list[int]], dtype: str, quantize: str | None
                ) -> Iterator[np.ndarray]:
    """Float32 logits of every position of each chunk in turn, each chunk from an empty cache."""
    llama = Llama.build(ckpt_dir, max_seq_len=len(token_chunks[0]), max_batch_size=1, device="cpu", dtype=dtype,
                        quantize=quantize)
    for chunk in token_chunks:
        with torch.inference_mode():
            yield llama.model.step(torch.tensor([chunk]), torch.zeros(1, dtype=torch.long))[0].numpy()


def llama_cpp_model(gguf: Path, ctx: int, threads: int):
    from llama_cpp import Llama as LlamaCpp

    return LlamaCpp(model_path=str(gguf), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, n_threads=threads,
                    logits_all=True, verbose=False)


def llama_cpp_logits(gguf: Path, token_chunks: list[list[int]], threads: int) -> Iterator[np.ndarray]:
    """llama.cpp's logits of every position of each chunk in turn (the KV cache cleared between chunks)."""
    model = llama_cpp_model(gguf, len(token_chunks[0]), threads)
    for chunk in token_chunks:
        model.reset()  # the next eval starts at position 0 and drops the cached keys and values from there
        model.eval(chunk)
        yield model.scores[: len(chunk)]


def llama_cpp_quantize(src: Path, dst: Path, file_type: str, threads: int, pure: bool = True) -> Path:
    """`src` rewritten by llama.cpp's quantizer with every 2-D tensor in `file_type` (F16, Q8_0 or Q4_0), or with
    `pure=False` in llama.cpp's default mix for that type (the output layer, or a tied embedding, in Q6_K)."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    if dst.is_file():
        return dst
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.allow_requantize, params.pure, params.nthread = True, pure, threads
    with suppress_stdout_stderr(disable=False):
        failed = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if failed:
        raise RuntimeError(f"llama.cpp could not write {src} as {file_type} to {dst}")
    return dst


def checkpoint_of(gguf: Path, dst: Path, dtype: str) -> Path:
    if not (dst / "params.json").is_file():
        convert_from_gguf(gguf, dst, dtype=dtype)
    return dst


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=DEFAULT_GGUF, help="a GGUF file of the llama architecture")
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the text to score")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per chunk, each from an empty cache")
    parser.add_argument("--second_half", action="store_true", help="score only each chunk's second half")
    parser.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp")
    parser.add_argument("--work_dir", type=Path, default=DEFAULT_WORK_DIR, help="converted files are kept here")
    parser.add_argument("--quantized", action="store_true",
                        help="also bfloat16, int8 and int4 of the file's F16 weights, beside llama.cpp's F16, Q8_0, "
                        "Q4_0")
    args = parser.parse_args()
    if args.ctx < 2 or args.tokens < args.ctx:
        parser.error(f"--ctx must be at least 2 and --tokens at least --ctx, got {args.ctx} and {args.tokens}")
    if not args.gguf.is_file():
        parser.error(f"--gguf {args.gguf} is not a file")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    work = args.work_dir / args.gguf.stem
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint_of(args.gguf, work / "ckpt-float32", "float32")
    tokenizer = Tokenizer(ckpt / "tokenizer.model")
    text = fixed_text(min_chars=8 * args.tokens)
    token_chunks = chunks(tokenizer, text, args.tokens, args.ctx)
    first_scored = args.ctx // 2 if args.second_half else 1
    ids = [i for chunk in token_chunks for i in chunk]
    ours_ids = tokenizer.encode(text, bos=False, eos=False)[: args.tokens]
    theirs = llama_cpp_model(args.gguf, args.ctx, args.threads).tokenize(text.encode(), add_bos=False, special=False)
    agree = next((n for n, (a, b) in enumerate(zip(ours_ids, theirs)) if a != b), len(ours_ids))
    print(f"text: pydoc_data.topics of Python {platform.python_version()}, {len(token_chunks)} chunks of {args.ctx} "
          f"tokens (ids sha256 {hashlib.sha256(str(ids).encode()).hexdigest()[:12]}; llama.cpp's tokenizer gives the "
          f"same first {agree} of the text's {len(ours_ids)} ids), scored from position {first_scored} of each: "
          f"{len(token_chunks) * (args.ctx - first_scored)} positions")
    rows = {f"ours float32 ({args.gguf.name} via from_gguf)": ours_logits(ckpt, token_chunks, "float32", None),
            f"llama.cpp {args.gguf.name}": llama_cpp_logits(args.gguf, token_chunks, args.threads)}
    results = {name: perplexity(logits, token_chunks, first_scored) for name, logits in rows.items()}
    ours, cpp = results.values()
    for name, value in results.items():
        print(f"{name}: perplexity {value:.4f}")
    print(f"ours / llama.cpp: {ours / cpp:.4f} ({100 * (ours / cpp - 1):+.2f} %)")
    if args.quantized:
        quantized_rows(args, work, token_chunks, first_scored)
    sys.stdout.flush()


def quantized_rows(args: argparse.Namespace, work: Path, token_chunks: list[list[int]], first_scored: int) -> None:
    """Perplexity of 16-bit weights and of their 8- and 4-bit forms, ours and llama.cpp's, and each increase."""
    f16 = llama_cpp_quantize(args.gguf, work / "F16.gguf", "F16", args.threads)
    ckpt = checkpoint_of(f16, work / "ckpt-bfloat16", "bfloat16")
    ours = {name: perplexity(ours_logits(ckpt, token_chunks, "bfloat16", quantize), token_chunks, first_scored)
            for name, quantize in (("bfloat16", None), ("int8", "int8"), ("int4", "int4"))}
    files = {name: llama_cpp_quantize(f16, work / f"{name}.gguf", name, args.threads) for name in ("Q8_0", "Q4_0")}
    files["Q4_0 default mix"] = llama_cpp_quantize(f16, work / "Q4_0-mix.gguf", "Q4_0", args.threads, pure=False)
    cpp = {name: perplexity(llama_cpp_logits(path, token_chunks, args.threads), token_chunks, first_scored)
           for name, path in {"F16": f16, **files}.items()}
    for label, values in (("ours", ours), ("llama.cpp", cpp)):
        (base_name, base), *quantized = values.items()
        print(f"{label} (from {f16.name}): {base_name} {base:.4f}, " + ", ".join(
            f"{name} {value:.4f} ({100 * (value / base - 1):+.2f} %)" for name, value in quantized))


if __name__ == "__main__":
    main()
