"""The engine runs many sequences at once, each in its own KV slot, and each gives what it gives alone.

Every test drives an `Engine` the way a server does: submit requests (from any thread), call `step()` until they
are done, read each `Request`. The model is the tiny random float32 checkpoint.
"""

import threading
import time

import pytest
import torch

from llama import Llama
from llama.engine import Engine, Request, SamplingParams

GREEDY = SamplingParams(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=64, max_batch_size=4)


class Recorder:
    """A step function that records each call: ("prefill", slot, start, length) for a one-row prompt chunk,
    ("prefill", slots, starts, lengths) for several, ("decode", positions of the rows) for a one-token step."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, tokens, start_pos, slot=0, kv_len=None, last_logits_only=False, seq_lens=None):
        rows, width = tokens.shape
        if width == 1 and not last_logits_only:  # prompts ask for their last logits only (but prompt scoring)
            self.calls.append(("decode", start_pos.tolist()))
        elif rows == 1:
            self.calls.append(("prefill", slot, start_pos.item(), width))
        else:
            slots = slot.tolist() if isinstance(slot, torch.Tensor) else list(range(slot, slot + rows))
            lengths = seq_lens.tolist() if seq_lens is not None else [width] * rows
            self.calls.append(("prefill", slots, start_pos.tolist(), lengths))
        return self.model.step(tokens, start_pos, slot, kv_len, last_logits_only, seq_lens)


def engine(llama: Llama, **kwargs) -> Engine:
    """A fresh engine on the shared model, recording its forward calls in `engine.forward.calls`."""
    return Engine(llama.model, llama.tokenizer, torch.Generator().manual_seed(0), forward=Recorder(llama.model),
                  **kwargs)


def run(engine: Engine, *requests: tuple[list[int], SamplingParams]) -> list[Request]:
    sequences = [engine.submit(prompt, params) for prompt, params in requests]
    while engine.step():
        pass
    return sequences


def prompt(llama: Llama, text: str) -> list[int]:
    return llama.tokenizer.encode(text, bos=True, eos=False)


def alone(llama: Llama, tokens: list[int], params: SamplingParams = GREEDY) -> list[int]:
    return run(engine(llama), (tokens, params))[0].tokens


def test_sequences_started_at_different_steps_share_decode_steps(llama):
    long, short = prompt(llama, "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"), prompt(llama, "Hello")
    e = engine(llama)
    first = e.submit(long, SamplingParams(max_tokens=12, temperature=0))
    for _ in range(3):
        e.step()
    second = e.submit(short, GREEDY)
    while e.step():
        pass
    # A decode step with both rows, each at its own position.
    shared = [positions for kind, *positions in e.forward.calls if kind == "decode" and len(positions[0]) == 2]
    assert shared and all(a != b for a, b in (p[0] for p in shared))
    assert first.tokens == alone(llama, long, SamplingParams(max_tokens=12, temperature=0))
    assert second.tokens == alone(llama, short)


def test_a_short_request_started_while_a_long_one_runs_finishes_first(llama):
    e = engine(llama)
    finished: list[str] = []

    def note(name):
        return lambda sequence: finished.append(name) if sequence.finished else None

    e.submit(prompt(llama, "Once upon a time"), SamplingParams(max_tokens=30, temperature=0), note("long"))
    e.step()
    e.submit(prompt(llama, "Hi"), SamplingParams(max_tokens=3, temperature=0), note("short"))
    while e.step():
        pass
    assert finished == ["short", "long"]


def test_more_requests_than_slots_are_queued_and_each_gives_its_solo_result(llama, prompts):
    requests = [prompt(llama, p) for p in [*prompts, "Hi", "Once upon a time", "Item 7 is"]]  # 6 on 4 slots
    e = engine(llama)
    sequences = [e.submit(tokens, GREEDY) for tokens in requests]
    e.step()
    assert [s.slot for s in sequences] == [0, 1, 2, 3, None, None] and len(e.queue) == 2
    while e.step():
        pass
    assert [s.tokens for s in sequences] == [alone(llama, tokens) for tokens in requests]
    assert all(s.finish_reason == "length" and len(s.tokens) == 8 for s in sequences)


def test_a_seeded_sampled_request_gives_the_same_tokens_whatever_else_runs(llama, prompts):
    sampled = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=1234)
    tokens = prompt(llama, prompts[0])
    others = [(prompt(llama, p), SamplingParams(max_tokens=6, temperature=0.8, seed=i)) for i, p in enumerate(prompts)]
    crowded = run(engine(llama), others[0], (tokens, sampled), *others[1:], (tokens, GREEDY))[1]
    assert crowded.tokens == alone(llama, tokens, sampled)
    assert crowded.tokens != alone(llama, tokens, SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=1))


def test_cancel_frees_the_slot_for_a_queued_request(llama, prompts):
    e = engine(llama)
    running = [e.submit(prompt(llama, p), SamplingParams(max_tokens=40, temperature=0)) for p in [*prompts, "Hi"]]
    queued = e.submit(prompt(llama, "Hello"), GREEDY)
    e.step()
    assert queued.slot is None and not queued.finished
    e.cancel(running[1])
    e.step()
    assert running[1].finish_reason == "cancelled" and running[1].slot is None
    assert queued.slot == 1  # admitted at once into the freed slot
    while e.step():
        pass
    assert queued.tokens == alone(llama, prompt(llama, "Hello"))


def test_chunked_prefill_equals_one_piece(llama):
    text = "In the beginning the universe was created. This has made a lot of people very angry."
    tokens = prompt(llama, text)
    params = SamplingParams(max_tokens=6, temperature=0, echo_logprobs=True, top_logprobs=3)
    chunked_engine = engine(llama, prefill_chunk=5)
    chunked, whole = run(chunked_engine, (tokens, params))[0], run(engine(llama), (tokens, params))[0]
    assert [call[3] for call in chunked_engine.forward.calls if call[0] == "prefill"] == [5] * (len(tokens) // 5) + (
        [len(tokens) % 5] if len(tokens) % 5 else [])
    assert chunked.tokens == whole.tokens
    assert chunked.prompt_logprobs[0] is None and len(chunked.prompt_logprobs) == len(tokens)
    assert chunked.prompt_logprobs[1:] == pytest.approx(whole.prompt_logprobs[1:], abs=1e-5)
    assert [[t for t, _ in top] for top in chunked.prompt_top_logprobs[1:]] == [
        [t for t, _ in top] for top in whole.prompt_top_logprobs[1:]]


def test_a_long_prompt_is_prefilled_in_chunks_between_the_decode_steps_of_running_sequences(llama):
    e = engine(llama, prefill_chunk=4)
    running = e.submit(prompt(llama, "Hi"), SamplingParams(max_tokens=20, temperature=0))
    e.step()
    long = e.submit(prompt(llama, "word " * 20), GREEDY)
    while e.step():
        pass
    kinds = [call[0] for call in e.forward.calls[1:]]
    assert kinds[:4] == ["prefill", "decode", "prefill", "decode"]  # the running sequence waits for 4 tokens at most
    assert long.tokens == alone(llama, long.prompt_tokens) and running.tokens == alone(
        llama, running.prompt_tokens, SamplingParams(max_tokens=20, temperature=0))


def test_logprobs_are_log_softmax_of_the_model_logits(llama, prompts):
    tokens = prompt(llama, prompts[2])
    params = SamplingParams(max_tokens=5, temperature=0, logprobs=True, top_logprobs=2, echo_logprobs=True)
    sequence = run(engine(llama), (prompt(llama, "Hi"), GREEDY), (tokens, params))[1]
    everything = tokens + sequence.tokens
    expected = torch.log_softmax(llama.model(torch.tensor([everything]), 0)[0], dim=-1)  # (len, vocab)
    predicted = [expected[i - 1, t].item() for i, t in enumerate(everything) if i > 0]
    assert sequence.prompt_logprobs[1:] + sequence.logprobs == pytest.approx(predicted, abs=1e-4)
    assert sequence.prompt_logprobs[0] is None and sequence.prompt_top_logprobs[0] is None
    tops = sequence.prompt_top_logprobs[1:] + sequence.top_logprobs
    for position, top in enumerate(tops):
        values, ids = expected[position].topk(2)
        assert [t for t, _ in top] == ids.tolist() and [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)


def test_max_tokens_zero_scores_the_prompt_only(llama):
    tokens = [llama.tokenizer.bos_id] + [1000] * 63  # the whole context: allowed when nothing is generated
    scored = run(engine(llama), (tokens, SamplingParams(max_tokens=0, echo_logprobs=True)))[0]
    assert scored.tokens == [] and scored.finish_reason == "length" and len(scored.prompt_logprobs) == 64
    assert run(engine(llama), (tokens, SamplingParams(max_tokens=0)))[0].finish_reason == "length"


def test_submit_from_another_thread_while_stepping(llama, prompts):
    e = engine(llama)
    requests = [prompt(llama, p) for p in [*prompts, "Hi", "Hello there", "Item 7 is"]]
    sequences: list[Request] = []

    def submit_all():
        for tokens in requests:
            sequences.append(e.submit(tokens, GREEDY))
            time.sleep(0.01)

    thread = threading.Thread(target=submit_all)
    thread.start()
    while thread.is_alive():  # requests arrive while earlier ones run
        e.step()
    thread.join()
    while e.step():
        pass
    assert [s.tokens for s in sequences] == [alone(llama, tokens) for tokens in requests]


@pytest.mark.parametrize(
    ("tokens", "params", "message"),
    [
        ([], GREEDY, "prompt_tokens is empty"),
        ([1, 128256], GREEDY, r"prompt_tokens has token ids outside \[0, 128256\): \[128256\]"),
        ([1] * 64, GREEDY, "prompt_tokens has 64 tokens; at most 63 fit in max_seq_len=64 with max_tokens > 0"),
        ([1] * 65, SamplingParams(max_tokens=0), "at most 64 fit"),
        ([1], SamplingParams(max_tokens=-1), "max_tokens must be an integer >= 0"),
        ([1], SamplingParams(max_tokens=4, temperature=-1), "temperature"),
        ([1], SamplingParams(max_tokens=4, top_p=0), "top_p"),
        ([1], SamplingParams(max_tokens=4, seed=-3), "seed"),
        ([1], SamplingParams(max_tokens=4, top_logprobs=21), "top_logprobs must be between 0 and 20"),
        ([1], SamplingParams(max_tokens=4, logprobs=1), "logprobs must be True or False"),
        ([1], {"max_tokens": 4}, "params must be a SamplingParams"),
        ([1], SamplingParams(max_tokens=4, logit_bias={5: 101}), r"logit_bias\[5\] must be a number in \[-100, 100\]"),
        ([1], SamplingParams(max_tokens=4, logit_bias={"5": 1}), "a logit_bias token id must be an integer >= 0"),
        ([1], SamplingParams(max_tokens=4, logit_bias={128256: 1}), r"logit_bias has token ids outside \[0, 128256\)"),
        ([1], SamplingParams(max_tokens=4, logit_bias=[5]), "logit_bias must be a dict"),
        ([1], SamplingParams(max_tokens=4, presence_penalty=2.5), r"presence_penalty must be a number in \[-2, 2\]"),
        ([1], SamplingParams(max_tokens=4, frequency_penalty=float("nan")), "frequency_penalty must be a number"),
        ([1], SamplingParams(max_tokens=4, grammar={"type": "object"}), "grammar must be a str"),
        ("Hello", GREEDY, "prompt_tokens must be a list of token ids, got str"),
    ],
)
def test_bad_requests_are_refused_at_submit(llama, tokens, params, message):
    with pytest.raises(ValueError, match=message):
        engine(llama).submit(tokens, params)
