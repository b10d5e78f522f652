"""Chat with an instruction-tuned Llama 3 model.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/
"""

import time

from llama import Dialog, Llama
from llama.cli import check_generation_flags, echo, say, speed_line, with_build_options
from llama.fire_commands import run


@with_build_options(check=check_generation_flags, max_seq_len=512)
def main(
    build_options: dict,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_gen_len: int | None = None,
    stream: bool = True,
):
    """Print each dialog and the assistant's reply as it is generated, then the token counts and speed.

    `--stream=False` answers all dialogs as one batch and prints them at the end. Only the first process prints.
    """
    generator = Llama.build(**build_options)
    dialogs: list[Dialog] = [
        [{"role": "user", "content": "How do I make a simple tomato soup?"}],
        [
            {"role": "user", "content": "Suggest a name for a grey cat."},
            {"role": "assistant", "content": "How about Pepper? It is short, friendly and suits a grey coat."},
            {"role": "user", "content": "Give me two more in the same spirit."},
        ],
        [
            {"role": "system", "content": "Answer in exactly one sentence."},
            {"role": "user", "content": "Why is the sky blue?"},
        ],
        [
            {"role": "system", "content": "You are a pirate; stay in character."},
            {"role": "user", "content": "What is the best way to learn to swim?"},
        ],
        [
            {"role": "system", "content": "Environment: ipython\nTools: brave_search"},
            {"role": "user", "content": "What is the weather in Lisbon right now?"},
        ],
    ]
    if stream:
        # Every process runs each stream (they compute each token together); only the first one prints.
        tokenizer = generator.tokenizer
        started, n_prompt, n_generated = time.perf_counter(), 0, 0
        for dialog in dialogs:
            reply = generator.stream_chat(dialog, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
            for message in dialog:
                say(f"{message['role'].capitalize()}: {message['content']}\n")
            say("> Assistant: ", end="", flush=True)
            echo(reply)
            tool_call = tokenizer.eom_id is not None and (  # only Llama 3's vocabulary marks tool calls
                reply.tokens[:1] == [tokenizer.python_tag_id] or reply.stop_token == tokenizer.eom_id)
            say(" (tool call)" if tool_call else "")
            say("\n==================================\n")
            n_prompt, n_generated = n_prompt + len(reply.prompt_tokens), n_generated + len(reply.tokens)
        say(speed_line(n_prompt, n_generated, time.perf_counter() - started))
        return
    results = generator.chat_completion(dialogs, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    for dialog, result in zip(dialogs, results):
        for message in dialog:
            say(f"{message['role'].capitalize()}: {message['content']}\n")
        reply = result["generation"]
        tool_call = " (tool call)" if reply.get("python_tag") or reply.get("eom") else ""
        say(f"> {reply['role'].capitalize()}{tool_call}: {reply['content']}")
        say("\n==================================\n")


if __name__ == "__main__":
    run(main)
