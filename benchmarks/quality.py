"""What int8 and int4 weights cost in accuracy on a trained model: its logits in bfloat16 and quantized.

    python -m llama.checkpoint from_gguf SmolLM2-135M-Instruct.Q4_1.gguf smollm2-f32/ --dequantize --dtype float32
    python benchmarks/quality.py --ckpt_dir smollm2-f32/ [--text benchmarks/quality_text.txt] [--max_seq_len 512]

(a float checkpoint: one of GGUF blocks is quantized already and refuses `quantize`).

The text (by default a few paragraphs written for this benchmark) is scored in chunks of `max_seq_len` tokens by
the model in float32, bfloat16, and bfloat16 with int8 and with int4 weights. Printed: top-1 agreement and mean
KL(p || q) at every scored position for int8 and int4 against bfloat16 (and, for scale, bfloat16 against float32),
and each model's perplexity on the text. On the CPU; timings play no part.
"""

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from llama import Llama
from llama.tokenizer import Tokenizer

DEFAULT_TEXT = Path(__file__).with_name("quality_text.txt")


def score(ckpt_dir: str, tokens: list[int], max_seq_len: int, dtype: torch.dtype, quantize: str | None):
    """Log-probabilities (positions, vocab) of every token after the first of each chunk, and the targets."""
    llama = Llama.build(ckpt_dir, max_seq_len=max_seq_len, max_batch_size=1, device="cpu", dtype=dtype,
                        quantize=quantize)
    logprobs, targets = [], []
    for start in range(0, len(tokens) - 1, max_seq_len):
        chunk = torch.tensor([tokens[start : start + max_seq_len]])
        logprobs.append(F.log_softmax(llama.model(chunk, 0)[0, :-1], dim=-1))
        targets.append(chunk[0, 1:])
    return torch.cat(logprobs), torch.cat(targets)


def compare(reference: torch.Tensor, other: torch.Tensor) -> str:
    agreement = (reference.argmax(-1) == other.argmax(-1)).float().mean().item()
    kl = F.kl_div(other, reference, log_target=True, reduction="batchmean").item()
    return f"top-1 agreement {100 * agreement:.1f} %, mean KL {kl:.4f} nats"


def perplexity(logprobs: torch.Tensor, targets: torch.Tensor) -> float:
    return math.exp(-logprobs.gather(1, targets[:, None]).mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_dir", required=True, help="a Meta checkpoint folder (one shard)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="a UTF-8 text file to score")
    parser.add_argument("--max_seq_len", type=int, default=512, help="tokens per scored chunk")
    args = parser.parse_args()
    tokenizer = Tokenizer(Path(args.ckpt_dir) / "tokenizer.model")
    tokens = tokenizer.encode(args.text.read_text(), bos=tokenizer.add_bos, eos=False)
    runs = {"float32": (torch.float32, None), "bfloat16": (torch.bfloat16, None), "int8": (torch.bfloat16, "int8"),
            "int4": (torch.bfloat16, "int4")}
    results = {name: score(args.ckpt_dir, tokens, args.max_seq_len, dtype, quantize)
               for name, (dtype, quantize) in runs.items()}
    print(f"{args.ckpt_dir}: {results['int8'][0].shape[0]} positions of {args.text.name} ({len(tokens)} tokens)")
    for name in ("int8", "int4"):
        print(f"{name} vs bfloat16: {compare(results['bfloat16'][0], results[name][0])}")
    print(f"bfloat16 vs float32: {compare(results['float32'][0], results['bfloat16'][0])}")
    print("perplexity: " + ", ".join(f"{name} {perplexity(*results[name]):.3f}" for name in runs))


if __name__ == "__main__":
    main()
