"""Complete a few text prompts with a pretrained Llama 3 model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir Meta-Llama-3-8B/
"""

import os
import time

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
    quantize: str | None = None,
    compile: bool = False,
    stream: bool = True,
):
    """Print each prompt and its completion as it is generated, then the token counts and speed.

    `--stream=False` completes all prompts as one batch and prints them at the end. Only the first process prints.
    """
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        model_parallel_size=model_parallel_size,
        seed=seed,
        device=device,
        dtype=dtype,
        quantize=quantize,
        compile=compile,
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
    if stream:
        # Every process runs each stream (they compute each token together); only the first one prints.
        say = print if int(os.environ.get("RANK", 0)) == 0 else lambda *args, **kwargs: None
        started, n_prompt, n_generated = time.perf_counter(), 0, 0
        for prompt in prompts:
            text = generator.stream_completion(prompt, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
            say(f"{prompt}\n> ", end="", flush=True)
            for piece in text:
                say(piece, end="", flush=True)
            say("\n\n==================================\n")
            n_prompt, n_generated = n_prompt + len(text.prompt_tokens), n_generated + len(text.tokens)
        seconds = time.perf_counter() - started
        say(f"{n_prompt} prompt tokens, {n_generated} generated tokens in {seconds:.2f} s: "
            f"{n_generated / seconds:.1f} tokens/s")
        return
    results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    if int(os.environ.get("RANK", 0)) == 0:
        for prompt, result in zip(prompts, results):
            print(prompt)
            print(f"> {result['generation']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
