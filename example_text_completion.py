"""Complete a few text prompts with a pretrained Llama 3 model.

    torchrun --nproc_per_node 1 example_text_completion.py --ckpt_dir Meta-Llama-3-8B/
"""

import time

from llama import Llama
from llama.cli import check_generation_flags, echo, say, speed_line, with_build_options
from llama.fire_commands import run


@with_build_options(check=check_generation_flags, max_seq_len=128)
def main(
    build_options: dict,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int = 64,
    stream: bool = True,
):
    """Print each prompt and its completion as it is generated, then the token counts and speed.

    `--stream=False` completes all prompts as one batch and prints them at the end. Only the first process prints.
    """
    generator = Llama.build(**build_options)
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
        started, n_prompt, n_generated = time.perf_counter(), 0, 0
        for prompt in prompts:
            text = generator.stream_completion(prompt, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
            say(f"{prompt}\n> ", end="", flush=True)
            echo(text)
            say("\n\n==================================\n")
            n_prompt, n_generated = n_prompt + len(text.prompt_tokens), n_generated + len(text.tokens)
        say(speed_line(n_prompt, n_generated, time.perf_counter() - started))
        return
    results = generator.text_completion(prompts, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    for prompt, result in zip(prompts, results):
        say(prompt)
        say(f"> {result['generation']}")
        say("\n==================================\n")


if __name__ == "__main__":
    run(main)
