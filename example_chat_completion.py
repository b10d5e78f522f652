"""Chat with an instruction-tuned Llama 3 model.

    torchrun --nproc_per_node 1 example_chat_completion.py --ckpt_dir Meta-Llama-3-8B-Instruct/
"""

import os

import fire

from llama import Dialog, Llama


def main(
    ckpt_dir: str,
    tokenizer_path: str | None = None,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_seq_len: int = 512,
    max_batch_size: int = 4,
    max_gen_len: int | None = None,
    model_parallel_size: int | None = None,
    seed: int = 1,
    device: str | None = None,
    dtype: str | None = None,
):
    """Print each dialog followed by the assistant's reply (only the first process prints)."""
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
    results = generator.chat_completion(dialogs, temperature=temperature, top_p=top_p, max_gen_len=max_gen_len)
    if int(os.environ.get("RANK", 0)) == 0:
        for dialog, result in zip(dialogs, results):
            for message in dialog:
                print(f"{message['role'].capitalize()}: {message['content']}\n")
            reply = result["generation"]
            tool_call = " (tool call)" if reply.get("python_tag") or reply.get("eom") else ""
            print(f"> {reply['role'].capitalize()}{tool_call}: {reply['content']}")
            print("\n==================================\n")


if __name__ == "__main__":
    fire.Fire(main)
