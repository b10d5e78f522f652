"""Generates with a checkpoint in every process it runs in; the tests start it under torchrun.

For each checkpoint given, each rank saves what it produced to `{out}.{i}.rank{N}.pt` (i: the checkpoint's
position), so a test can check that all ranks agree and that any model-parallel size gives what one process gives.
"""

import fire
import torch
import torch.distributed as dist

from llama import Llama

PROMPTS = [
    "The capital of France is",
    "1, 2, 3, 4,",
    "Once upon a time in a small village by the sea, there lived",
]


def generate_all(llama: Llama) -> dict:
    """Greedy tokens, sampled text, full-forward logits for PROMPTS, and the logits of a decode step after the
    last prompt's other tokens."""
    prompt_tokens = [llama.tokenizer.encode(p, bos=True, eos=False) for p in PROMPTS]
    greedy, _ = llama.generate(prompt_tokens, max_gen_len=12, temperature=0)
    sampled = llama.text_completion(PROMPTS, temperature=1.0, top_p=0.95, max_gen_len=12)
    tokens = torch.tensor([prompt_tokens[2]], device=llama.device)
    logits = llama.model(tokens, 0)
    step = llama.model(tokens[:, -1:], tokens.shape[1] - 1)  # the cache holds the whole prompt already
    return {"greedy": greedy, "sampled": [s["generation"] for s in sampled], "logits": logits.cpu(),
            "decode_step": step.cpu()}


def main(out: str, *ckpt_dirs: str, seed: int = 1, quantize: str | None = None, compile: bool = False,
         dtype: str = "float32"):
    for i, ckpt_dir in enumerate(ckpt_dirs):
        llama = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=4, seed=seed, device="cpu", dtype=dtype,
                            quantize=quantize, compile=compile)
        torch.save(generate_all(llama), f"{out}.{i}.rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    fire.Fire(main)
