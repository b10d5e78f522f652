"""Complete a few text prompts with a pretrained Llama 3 model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir Meta-Llama-3-8B/
"""

import os

import fire

from llama import Llama


def main(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 128,
    max_gen_len: int = 64,
    max_batch_size: int = 4,
    model_parallel_size: int | None = None,
    seed: int = 1,
    device: str | None = None,
    dtype: str | None = None,
):
    """Print each prompt followed by its completion (only the first process prints)."""
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        model_parallel_size=model_parallel_size,
        seed=seed,
        device=device,
        dtype=dtype,
    )
    prompts = [
        # Plain continuations.
        "The three most surprising facts about octopuses are",
        "In simple terms, photosynthesis is the process by which",
        # The model infers the task from the shape of the text.
        """Dear neighbours,

        The garden party on Saturday""",
        # Few-shot: the examples set the pattern to continue.
        """Translate English to French:

        bread => pain
        library => bibliothèque
        thank you very much => merci beaucoup
        window =>""",
    ]
    results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    if int(os.environ.get("RANK", 0)) == 0:
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
