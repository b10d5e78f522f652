"""Rank 0 serves requests through `Llama.engine` while the other ranks follow its plan, as a server does; the
tests start it under torchrun (and run `serve` in one process to compare)."""

import fire
import torch
import torch.distributed as dist

from generation_worker import PROMPTS
from llama import Llama
from llama.engine import SamplingParams


def serve(llama: Llama) -> dict:
    """Requests arriving at different steps on two slots, one of them cancelled: what each produced."""
    engine, encode = llama.engine, lambda text: llama.tokenizer.encode(text, bos=True, eos=False)
    greedy, sampled = SamplingParams(max_tokens=10, temperature=0), SamplingParams(max_tokens=10, temperature=1.0)
    sequences = [engine.submit(encode(PROMPTS[0]), greedy), engine.submit(encode(PROMPTS[1]), sampled),
                 engine.submit(encode(PROMPTS[2]), greedy)]  # the third waits for a free slot
    for _ in range(3):
        engine.step()
    sequences.append(engine.submit(encode(PROMPTS[1]), SamplingParams(max_tokens=30, temperature=0.7, seed=3)))
    engine.step()
    engine.cancel(sequences[0])
    while engine.step():
        pass
    # The next turn of the third sequence's "chat": its prompt starts with that sequence's prompt and reply,
    # whose keys and values stay cached in its slot.
    follow_up = encode(PROMPTS[2]) + sequences[2].tokens + llama.tokenizer.encode(" and then", bos=False, eos=False)
    sequences.append(engine.submit(follow_up, greedy))
    while engine.step():
        pass
    return {"tokens": [s.tokens for s in sequences], "finish_reasons": [s.finish_reason for s in sequences],
            "prefix_hit_tokens": engine.stats.prefix_hit_tokens}


def serve_constrained(llama: Llama) -> dict:
    """A grammar-constrained request and a penalised one sharing decode steps (rank 0 alone holds the matcher)."""
    from llama.grammar import json_schema_grammar

    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {
        "type": "boolean"}}, "required": ["n", "ok"], "additionalProperties": False}
    prompt = llama.tokenizer.encode(PROMPTS[0], bos=True, eos=False)
    sequences = [llama.engine.submit(prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=2,
                                                            grammar=json_schema_grammar(schema))),
                 llama.engine.submit(prompt, SamplingParams(max_tokens=10, temperature=0, frequency_penalty=2,
                                                            logit_bias={13: 5}))]
    while llama.engine.step():
        pass
    return {"tokens": [s.tokens for s in sequences], "finish_reasons": [s.finish_reason for s in sequences]}


def serve_prompt_lookup(llama: Llama) -> dict:
    """Greedy and sampled requests that repeat their prompts, drafting (the build's prompt_lookup): logit_bias keeps
    the random model's picks among a few tokens, so its text repeats and drafts are partly accepted."""
    bias = {t: 30.0 for t in (1000, 1001, 1002, 1003)}
    prompt = [llama.tokenizer.bos_id, 1000, 1001, 1002, 1000, 1001, 1003, 1000, 1001]
    sequences = [llama.engine.submit(prompt, SamplingParams(max_tokens=30, temperature=0, logit_bias=bias)),
                 llama.engine.submit(prompt, SamplingParams(max_tokens=30, temperature=1.0, seed=4, logit_bias=bias))]
    while llama.engine.step():
        pass
    stats = llama.engine.stats
    return {"tokens": [s.tokens for s in sequences], "finish_reasons": [s.finish_reason for s in sequences],
            "drafted": [stats.drafts, stats.draft_tokens, stats.accepted_tokens]}


JOBS = {"serve": serve, "constrained": serve_constrained, "prompt_lookup": serve_prompt_lookup}


def main(out: str, ckpt_dir: str, job: str = "serve", prompt_lookup: int = 0) -> None:
    llama = Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=2, seed=1, device="cpu", dtype="float32",
                        prompt_lookup=prompt_lookup)
    if dist.get_rank() == 0:
        torch.save(JOBS[job](llama), out)
        llama.engine.shutdown()
    else:
        llama.engine.follow()  # returns when rank 0 shuts the engine down
        if job == "prompt_lookup":  # this rank drafted and kept what rank 0 did
            torch.save({"drafted": [llama.engine.stats.drafts, llama.engine.stats.draft_tokens,
                                    llama.engine.stats.accepted_tokens]}, f"{out}.rank{dist.get_rank()}")


if __name__ == "__main__":
    fire.Fire(main)
