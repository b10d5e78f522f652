"""Where the time of a batch-1 decode step on the CPU goes, in one process with the implementations taking turns.

    python benchmarks/decode_breakdown.py --ckpt_dir ~/.cache/llama3-bench/1B-seed0/meta --compile \\
        --gguf ~/.cache/llama3-bench/1B-seed0/model-F16.gguf

`benchmarks/generation.py` runs each implementation in a process of its own, one after another. On a shared
machine whose memory bandwidth drifts from minute to minute, that compares moments as much as code. Here every
implementation lives in one process and they take turns token by token, so each comparison is made at the same
moment. After a `--prompt_len` prompt, each of `--tokens` rounds times, in this order:

- ours: one eager decode step, as the engine makes it (`Transformer.step` on one token, batch 1);
- its linear layers alone: every linear layer of the model called once, in the step's order, on one row of its
  input width. The step minus this is the work between the matmuls: norms, rope, attention, SwiGLU and Python;
- ours compiled (`--compile`): one step through `Llama.build(..., compile=True)`'s compiled decoding (the
  engine's step function, `llama.engine.forward`; compiled before the rounds), on the same model and KV cache;
- ours as before `llama.bf16_cpu` (`--onednn`, bfloat16 on a processor with AVX-512 BF16): the same step with the
  linear layers on oneDNN's packed copies of their weights (made for this, twice the weights' memory) and torch's
  attention, RMSNorm and SwiGLU, each block through its modules;
- llama.cpp (`--gguf FILE`, needs llama-cpp-python): one token evaluated by llama.cpp on that GGUF file, which
  should hold the same weights (`benchmarks/generation.py --impl llama.cpp` writes F16, Q8_0 and Q4_0 ones).

It prints the median of each over the rounds. `--quantize int8` measures ours in int8 (compare it with a Q8_0
GGUF), `--quantize int4` in int4 (compare it with a Q4_0 GGUF). Nothing is asserted on timings.
"""

import argparse
import contextlib
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # this clone's package, even where another copy is installed, as generation.py does
    sys.path.insert(0, str(ROOT))

from llama.generation import Llama  # noqa: E402
from llama.int4 import Int4Linear, Q8BlockLinear  # noqa: E402
from llama.cpu_decode import Bf16FeedForward, Bf16RMSNorm, Bf16TransformerBlock, bf16_decode_step  # noqa: E402
from llama.kernels import (QUANTIZATIONS, Bf16Linear, Int8Linear, PackedLinear, _onednn_linear,  # noqa: E402
                           pack_for_cpu)
from llama.model import Attention, FeedForward, RMSNorm  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_dir", type=Path, required=True, help="a Meta checkpoint folder")
    parser.add_argument("--gguf", type=Path, default=None, help="also time llama.cpp on this GGUF file")
    parser.add_argument("--compile", action="store_true", help="also time ours with compile=True")
    parser.add_argument("--onednn", action="store_true", help="also time ours without llama.bf16_cpu's kernels")
    parser.add_argument("--quantize", choices=QUANTIZATIONS, default=None, help="build ours quantized")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prompt_len", type=int, default=128, help="tokens in the cache before the first round")
    parser.add_argument("--tokens", type=int, default=32, help="rounds (one token of each implementation each)")
    parser.add_argument("--threads", type=int, default=2, help="threads of torch and of llama.cpp")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt and the decoded tokens")
    args = parser.parse_args()
    for name in ("prompt_len", "tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.gguf is not None:
        if not args.gguf.is_file():
            parser.error(f"--gguf {args.gguf}: no such file")
        if importlib.util.find_spec("llama_cpp") is None:
            parser.error("--gguf needs llama-cpp-python (pip install llama-cpp-python)")
    return args


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """The model's matmul layers in the order a decode step calls them (registration order), without a blocked
    embedding's own layer (a GGUF file's untied embedding), which a step only looks rows up in."""
    kinds = (nn.Linear, Bf16Linear, PackedLinear, Int8Linear, Int4Linear, Q8BlockLinear)
    lookup_only = set(model.tok_embeddings.modules()) - set(model.output.modules())
    return [module for module in model.modules() if isinstance(module, kinds) and module not in lookup_only]


def read_bytes(layer: nn.Module) -> int:
    """Bytes of weights a matmul of `layer` reads: its weight's, or a block layer's packed values, scales (and
    torch's zero points), where its `weight` is shape-only."""
    if isinstance(layer, (Int4Linear, Q8BlockLinear)) and layer.packed is not None:
        return sum(t.nbytes for t in (layer.packed, getattr(layer, "scales_and_zeros", None)) if t is not None)
    return layer.weight.numel() * layer.weight.element_size()


def _unpacked(layer: Bf16Linear) -> torch.Tensor:
    """The (out_features, in_features) weight that `bf16_cpu.pack` packed into `layer.packed`."""
    groups, pairs, group_rows, _ = layer.packed.shape
    rows = layer.packed.transpose(1, 2).reshape(groups * group_rows, pairs * 2)
    return rows[: layer.weight.shape[0], : layer.weight.shape[1]].contiguous()


def without_bf16_kernels(model: nn.Module) -> Callable[[], contextlib.AbstractContextManager]:
    """A context in which `model` computes as before `llama.bf16_cpu`: its `Bf16Linear`s on oneDNN's packed copies
    of their weights (made here), torch's attention, RMSNorm and SwiGLU, each block through its modules."""
    linears = [m for m in model.modules() if isinstance(m, Bf16Linear)]
    if not linears:
        raise SystemExit("--onednn: this model has no Bf16Linear layers (not bfloat16, or no AVX-512 BF16)")
    packed = {m: pack_for_cpu(_unpacked(m)) for m in linears}
    attentions = [m for m in model.modules() if isinstance(m, Attention)]
    norms = [m for m in model.modules() if isinstance(m, Bf16RMSNorm)]
    feed_forwards = [m for m in model.modules() if isinstance(m, Bf16FeedForward)]
    plans = {m: m.plan for m in model.modules() if isinstance(m, Bf16TransformerBlock)}

    @contextlib.contextmanager
    def switched():
        for m in linears:  # an instance attribute shadows the class's forward, which nn.Module calls
            m.forward = lambda x, weight=packed[m]: _onednn_linear(x, weight)
        for norm in norms:
            norm.forward = lambda x, norm=norm: RMSNorm.forward(norm, x)
        for feed_forward in feed_forwards:
            feed_forward.forward = lambda x, feed_forward=feed_forward: FeedForward.forward(feed_forward, x)
        for attention in attentions:
            attention.decode_step = None
        for block in plans:
            block.plan = None
        try:
            yield
        finally:
            for m in linears + norms + feed_forwards:
                del m.forward
            for attention in attentions:
                attention.decode_step = bf16_decode_step
            for block, plan in plans.items():
                block.plan = plan

    return switched


@torch.inference_mode()
def decode(step: Callable[..., torch.Tensor], token: torch.Tensor, position: int) -> torch.Tensor:
    """One decode step of `token` (1, 1) at `position`, called as the engine calls its step function."""
    return step(token, torch.tensor([position]), kv_len=position + 1)


def timed(call: Callable[[], object]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    # Ours decodes up to three times per round (eager, compiled, with oneDNN), each step at the next position.
    max_seq_len = args.prompt_len + (2 + args.compile + args.onednn) * args.tokens + 2
    llama = Llama.build(args.ckpt_dir, max_seq_len=max_seq_len, max_batch_size=1, device="cpu", dtype=args.dtype,
                        quantize=args.quantize, compile=args.compile)
    model = llama.model
    generator = torch.Generator().manual_seed(args.seed)
    vocab = model.args.vocab_size
    prompt = torch.randint(0, vocab, (1, args.prompt_len), generator=generator)
    tokens = torch.randint(0, vocab, (args.tokens, 1, 1), generator=generator)

    layers = linear_layers(model)
    dtype = model.norm.weight.dtype
    rows = {layer: torch.randn(1, 1, layer.weight.shape[1], generator=generator).to(dtype) for layer in layers}
    weight_bytes = sum(read_bytes(layer) for layer in layers)

    def linears_alone() -> None:
        for layer in layers:
            layer(rows[layer])

    position = args.prompt_len
    model(prompt, 0)
    linears_alone()  # first touch of every packed weight
    if args.compile:
        decode(llama.engine.forward, tokens[0], position)  # compiles the batch-1 step
        position += 1

    before = without_bf16_kernels(model) if args.onednn else None
    llama_cpp_model = None
    if args.gguf is not None:
        import llama_cpp
        llama_cpp_model = llama_cpp.Llama(model_path=str(args.gguf), n_ctx=args.prompt_len + args.tokens + 1,
                                          n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
        llama_cpp_model.eval(prompt[0].tolist())

    times: dict[str, list[float]] = {"ours": [], "linears": []}
    for token in tokens:
        times["ours"].append(timed(lambda: decode(model.step, token, position)))
        position += 1
        times["linears"].append(timed(linears_alone))
        if args.compile:
            times.setdefault("compiled", []).append(timed(lambda: decode(llama.engine.forward, token, position)))
            position += 1
        if args.onednn:
            with before():
                times.setdefault("onednn", []).append(timed(lambda: decode(model.step, token, position)))
            position += 1
        if llama_cpp_model is not None:
            times.setdefault("llama.cpp", []).append(timed(lambda: llama_cpp_model.eval([int(token)])))
    print_table(args, times, weight_bytes)


def print_table(args: argparse.Namespace, times: dict[str, list[float]], weight_bytes: int) -> None:
    def median_ms(values: list[float]) -> float:
        return statistics.median(values) * 1e3

    between = [step - alone for step, alone in zip(times["ours"], times["linears"])]
    linears_ms = median_ms(times["linears"])
    ours = "ours" if args.quantize is None else f"ours {args.quantize}"
    rows = [
        (ours, median_ms(times["ours"]), True),
        (f"its linear layers alone ({weight_bytes / 1e9:.3g} GB of weights, "
         f"{weight_bytes / linears_ms / 1e6:.1f} GB/s)", linears_ms, False),
        ("the rest of its step (per round: step minus linear layers)", median_ms(between), False),
    ]
    if "compiled" in times:
        rows.append((f"{ours} compiled", median_ms(times["compiled"]), True))
    if "onednn" in times:
        rows.append(("ours as before bf16_cpu (oneDNN's packed weights, torch's attention, RMSNorm and SwiGLU)",
                     median_ms(times["onednn"]), True))
    if "llama.cpp" in times:
        rows.append((f"llama.cpp ({args.gguf.name})", median_ms(times["llama.cpp"]), True))
    print(f"| batch-1 decode, median of {args.tokens} rounds | ms per token | tok/s |")
    print("|---|---|---|")
    for name, ms, is_step in rows:
        print(f"| {name} | {ms:.2f} | {1e3 / ms:.2f} |" if is_step else f"| {name} | {ms:.2f} | – |")
    print(f"\n{args.ckpt_dir}, {args.dtype}, {args.threads} threads, after a {args.prompt_len}-token prompt; "
          f"torch {torch.__version__}.")


if __name__ == "__main__":
    main()
