"""A KV slot keeps the keys and values of the sequence that last ran in it, and a new prompt that starts the same
way reuses them (in place, or copied from another slot) instead of computing them again, with the same result as
an engine that computes everything. Prompts admitted together are prefilled in one forward call.

The model is the tiny random float32 checkpoint, so reused keys and values (computed in other chunk shapes) give
logprobs equal to within float32 rounding; the tolerance below is tight.
"""

import pytest
import torch

from llama import Llama
from llama.engine import Engine, Request, SamplingParams
from llama.prefill_plan import plan_prefill
from llama.prefix_cache import MIN_COPY

GREEDY = SamplingParams(max_tokens=8, temperature=0, logprobs=True)
SAMPLED = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.95, seed=7)


@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=128, max_batch_size=4)


class Counting:
    """engine.forward's stand-in that counts forward calls and the real prompt tokens they compute."""

    def __init__(self, step):
        self.step, self.calls, self.prefill_calls, self.prefill_tokens = step, 0, 0, 0

    def __call__(self, tokens, start_pos, slot=0, kv_len=None, last_logits_only=False, seq_lens=None):
        self.calls += 1
        if last_logits_only:  # a prompt chunk (decode steps want every row's logits)
            self.prefill_calls += 1
            self.prefill_tokens += int(seq_lens.sum()) if seq_lens is not None else tokens.numel()
        return self.step(tokens, start_pos, slot, kv_len, last_logits_only, seq_lens)


def engine(llama: Llama, **kwargs) -> Engine:
    """A fresh engine (empty caches, as far as the engine knows) on the shared model, counting its calls."""
    made = Engine(llama.model, llama.tokenizer, torch.Generator().manual_seed(0), **kwargs)
    made.forward = Counting(made.forward)
    return made


def run(engine: Engine, *requests: tuple[list[int], SamplingParams]) -> list[Request]:
    sequences = [engine.submit(prompt, params) for prompt, params in requests]
    while engine.step():
        pass
    return sequences


def text(llama: Llama, words: str, bos: bool = False) -> list[int]:
    return llama.tokenizer.encode(words, bos=bos, eos=False)


def without_reuse(llama: Llama, prompt: list[int], params: SamplingParams = GREEDY) -> Request:
    return run(engine(llama, prefix_reuse=False), (prompt, params))[0]


def assert_same(reused: Request, computed: Request) -> None:
    assert reused.tokens == computed.tokens
    assert reused.logprobs == pytest.approx(computed.logprobs, abs=1e-5)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED])
def test_a_chat_follow_up_reuses_the_first_turn_and_its_reply_in_place(llama, params):
    e = engine(llama)
    first_prompt = text(llama, "You are a helpful assistant. Tell me about the sea and its long tides.", bos=True)
    first, other = run(e, (first_prompt, params), (text(llama, "Hi", bos=True), SamplingParams(
        max_tokens=30, temperature=0)))
    # The other sequence kept decoding after the first had finished: its steps' row for the first's free slot
    # must not have written over the cached keys and values.
    follow_up = first_prompt + first.tokens + text(llama, " And what about rivers?")
    queried, calls_before, tokens_before = e.stats.prefix_queried_tokens, e.forward.calls, e.forward.prefill_tokens
    second = run(e, (follow_up, params))[0]
    cached = len(first_prompt) + len(first.tokens) - 1  # the last reply token was picked, never fed back
    assert e.stats.prefix_hit_tokens == cached and e.stats.prefix_queried_tokens - queried == len(follow_up)
    assert e.forward.prefill_tokens - tokens_before == len(follow_up) - cached  # only the new tokens computed
    assert e.forward.calls - calls_before == params.max_tokens  # one prefill call, then the decode steps
    assert_same(second, without_reuse(llama, follow_up, params))
    assert other.tokens == without_reuse(llama, other.prompt_tokens, other.params).tokens


def test_a_shared_system_prompt_is_copied_from_a_running_sequence(llama):
    system = text(llama, "System: answer briefly and politely, in English, to every question you are asked.",
                  bos=True)
    assert len(system) > MIN_COPY
    e = engine(llama)
    running = e.submit(system + text(llama, " Q: what is two plus two?"), SamplingParams(max_tokens=40,
                                                                                         temperature=0))
    e.step()
    asked = e.submit(system + text(llama, " Q: name a colour."), GREEDY)
    e.step()
    shared = next(i for i, (a, b) in enumerate(zip(running.prompt_tokens, asked.prompt_tokens)) if a != b)
    assert shared >= len(system)  # the system prompt, and " Q:"
    assert asked.slot != running.slot and e.stats.prefix_hit_tokens == shared
    while e.step():
        pass
    assert_same(asked, without_reuse(llama, asked.prompt_tokens))
    assert running.tokens == without_reuse(llama, running.prompt_tokens, running.params).tokens


def test_a_new_prompt_overwrites_the_least_recently_used_cache_below_the_running_slots(llama):
    e = engine(llama)
    prompts = [text(llama, f"Story {i}: once upon a time a {animal} lived by the river and sang every day.",
                    bos=True) for i, animal in enumerate(["cat", "dog", "fox", "owl"])]
    stories = [e.submit(p, SamplingParams(max_tokens=n, temperature=0)) for p, n in zip(prompts, [6, 2, 4, 40])]
    while not all(s.finished for s in stories[:3]):  # slot 1's story ends first, then 2's, then 0's; 3 runs on
        e.step()
    assert [s.slot for s in stories] == [None, None, None, 3]
    newcomer = e.submit(text(llama, "Something else entirely, with nothing in common at all.", bos=True), GREEDY)
    e.step()
    assert newcomer.slot == 1  # the oldest cache among the slots below the running one
    run(e)
    crowd = run(e, *[(text(llama, f"Question {i}: which way to the station, please?", bos=True), GREEDY)
                     for i in range(4)])
    assert all(s.tokens == without_reuse(llama, s.prompt_tokens).tokens for s in crowd)
    # All four slots were needed at once: no story is cached any more.
    assert not any(e.prefix.cached[slot][: len(p)] == p for slot in range(4) for p in prompts)


def test_prompt_scoring_reuses_nothing_but_its_slot_serves_the_next_prompt(llama):
    prompt = text(llama, "The quick brown fox jumps over the lazy dog, again and again, all day long.", bos=True)
    scoring = SamplingParams(max_tokens=2, temperature=0, echo_logprobs=True, logprobs=True)
    e = engine(llama)
    run(e, (prompt, GREEDY))
    scored = run(e, (prompt, scoring))[0]
    assert e.stats.prefix_hit_tokens == 0 and e.stats.prefix_queried_tokens == len(prompt)
    expected = without_reuse(llama, prompt, scoring)
    assert scored.prompt_logprobs[0] is None and expected.prompt_logprobs[0] is None
    assert scored.prompt_logprobs[1:] == pytest.approx(expected.prompt_logprobs[1:], abs=1e-5)
    assert_same(scored, expected)
    fresh = engine(llama)  # where the scored sequence's slot is the only cache
    scored = run(fresh, (prompt, scoring))[0]
    longer = prompt + scored.tokens + text(llama, " The end.")
    assert_same(run(fresh, (longer, GREEDY))[0], without_reuse(llama, longer))
    assert fresh.stats.prefix_hit_tokens == len(prompt) + 1  # the scored prompt and the first token it generated


def test_a_sequence_cancelled_mid_prefill_leaves_only_what_it_filled(llama):
    e = engine(llama, prefill_chunk=8)
    e.submit(text(llama, "Hi", bos=True), SamplingParams(max_tokens=40, temperature=0))
    e.step()
    long = e.submit(text(llama, "word " * 40, bos=True), GREEDY)
    e.step()
    e.step()  # two chunks of 8 between decode steps
    slot, filled = long.slot, long.filled
    assert filled == 16
    e.cancel(long)
    e.step()
    assert long.finish_reason == "cancelled" and e.prefix.cached[slot] == long.prompt_tokens[:16]
    again = e.submit(long.prompt_tokens, GREEDY)
    while e.step():
        pass
    assert e.stats.prefix_hit_tokens == 16
    assert_same(again, without_reuse(llama, long.prompt_tokens))


def test_prompts_admitted_together_are_prefilled_in_one_call_each_as_alone(llama):
    prompts = [text(llama, words, bos=True) for words in ["Hello", "The capital of France is", "1, 2, 3, 4, 5, 6,"]]
    e = engine(llama, prefix_reuse=False)
    together = run(e, *[(p, GREEDY) for p in prompts])
    assert e.forward.prefill_calls == 1 and e.forward.prefill_tokens == sum(map(len, prompts))  # ragged rows
    for sequence in together:
        assert_same(sequence, without_reuse(llama, sequence.prompt_tokens))


def test_prompts_beyond_the_prefill_budget_take_several_calls_of_similar_rows(llama):
    prompts = [text(llama, "word " * n, bos=True) for n in (20, 20, 20, 3)]
    e = engine(llama, prefix_reuse=False, prefill_chunk=48)
    together = run(e, *[(p, GREEDY) for p in prompts])
    assert e.forward.prefill_calls == 2
    for sequence in together:
        assert_same(sequence, without_reuse(llama, sequence.prompt_tokens))


def test_a_prefill_plan_keeps_every_row_and_its_padding_within_the_budget_and_the_context():
    rows, width = plan_prefill([(0, 128)] * 8, 512, 2048)
    assert (rows, width) == ([(i, 128) for i in range(4)], 128)
    rows, width = plan_prefill([(60, 3), (0, 10), (62, 1)], 64, 64)  # the first row is near the context's end
    assert (rows, width) == ([(0, 3), (1, 3)], 3)  # the third row's padding would pass the context's end
    rows, width = plan_prefill([(0, 30), (0, 4), (0, 30)], 64, 2048)
    assert (rows, width) == ([(0, 30), (2, 30)], 30)  # the short row would waste most of its area
    with pytest.raises(ValueError, match="an area >= 1"):
        plan_prefill([(0, 3)], 0, 64)


def test_a_row_near_the_end_of_the_context_is_prefilled_with_others(build_tiny):
    small = build_tiny(max_seq_len=32, max_batch_size=2)
    long, short = [small.tokenizer.bos_id] + [1000 + i for i in range(29)], [small.tokenizer.bos_id, 1500, 1600]
    e = engine(small)
    run(e, (long[:-1], SamplingParams(max_tokens=1, temperature=0)))  # caches 29 of long's 30 tokens
    both = run(e, (long, SamplingParams(max_tokens=2, temperature=0)), (short, SamplingParams(max_tokens=2,
                                                                                             temperature=0)))
    # Then long's last token and short's three share a call 3 wide: long's padding reaches position 31, the last.
    assert e.stats.prefix_hit_tokens == len(long) - 1 and e.forward.prefill_calls == 2
    for sequence in both:
        assert sequence.tokens == run(engine(small, prefix_reuse=False), (sequence.prompt_tokens,
                                                                          sequence.params))[0].tokens


@pytest.mark.parametrize("writer", ["meta_forward", "step", "another_engine"])
def test_keys_and_values_written_behind_the_engines_back_are_never_reused(llama, writer):
    """Meta's `forward`, a direct `model.step` or a second engine on the same model overwrite slots that the first
    engine still holds prefixes in: it notices (their keys changed) and computes those prompts again."""
    prompt = text(llama, "A long shared opening that several requests repeat word for word, " * 2, bos=True)
    follow_up = prompt + text(llama, " and then something new.")
    first = engine(llama)
    run(first, (prompt, GREEDY))
    assert first.prefix.cached[0][: len(prompt)] == prompt  # slot 0 holds the prompt, as far as `first` knows
    other = torch.randint(1000, 20000, (1, len(prompt)))
    with torch.inference_mode():
        if writer == "meta_forward":
            llama.model.forward(other, 0)
        elif writer == "step":
            llama.model.step(other, torch.zeros(1, dtype=torch.long), kv_len=len(prompt))
        else:
            run(engine(llama, prefix_reuse=False), (other[0].tolist(), GREEDY))
    hits = first.stats.prefix_hit_tokens
    [again] = run(first, (follow_up, GREEDY))
    assert first.stats.prefix_hit_tokens == hits  # nothing reused
    expected = without_reuse(llama, follow_up)
    assert again.tokens == expected.tokens
    assert again.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
