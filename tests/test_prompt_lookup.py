"""Prompt lookup drafts tokens from a sequence's own text and verifies them in its decode step: what it proposes,
how a draft is accepted (greedy and sampled), and that the engine's output is exactly what it is without it.

The tiny random model does not copy its prompt, so most engine tests steer it (`Follow`): at every position whose
token has a successor in a cycle, that successor gets +100, so the model continues the cycle wherever it is given
one, as a model editing a text continues the text it copies; elsewhere its own logits decide. The reference is
always the same engine with prompt lookup off, steered the same way.
"""

import importlib
import sys

import pytest
import torch

from llama import Llama
from llama.engine import Engine, Request, SamplingParams
from llama.prompt_lookup import propose, verify

BOS = 128000
A, B, C, D = 1000, 1001, 1002, 1003
EOT = 128009  # a stop token of the Llama 3 tokenizer
GREEDY = SamplingParams(max_tokens=20, temperature=0)


@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=64, max_batch_size=4)


class Follow:
    """A step function steered to continue `cycle` (see the module docstring); it records each call's width."""

    def __init__(self, model, cycle: list[int]):
        self.model, self.widths = model, []
        self.successor = torch.full((model.args.vocab_size,), -1)
        self.successor[cycle] = torch.tensor(cycle[1:] + cycle[:1])

    def __call__(self, tokens, start_pos, slot=0, kv_len=None, last_logits_only=False, seq_lens=None):
        self.widths.append(tokens.shape[1])
        logits = self.model.step(tokens, start_pos, slot, kv_len, last_logits_only, seq_lens=seq_lens)
        fed = tokens  # the tokens whose logits came back: all, or each row's last (real) one
        if last_logits_only:
            ends = seq_lens - 1 if seq_lens is not None else torch.full_like(start_pos, tokens.shape[1] - 1)
            fed = tokens.gather(1, ends[:, None])
        successor = self.successor[fed]
        rows, columns = torch.nonzero(successor >= 0, as_tuple=True)
        logits[rows, columns, successor[rows, columns]] += 100
        return logits


def engine(llama: Llama, prompt_lookup: int, cycle: list[int] = (A, B, C, D)) -> Engine:
    return Engine(llama.model, llama.tokenizer, torch.Generator().manual_seed(0),
                  forward=Follow(llama.model, list(cycle)), prompt_lookup=prompt_lookup)


def run(engine: Engine, *requests: tuple[list[int], SamplingParams]) -> list[Request]:
    sequences = [engine.submit(prompt, params) for prompt, params in requests]
    while engine.step():
        pass
    return sequences


def with_and_without(llama: Llama, *requests, cycle=(A, B, C, D)) -> tuple[list[Request], list[Request], Engine]:
    """The requests run with prompt lookup (up to 4 tokens) and without; and the engine that drafted."""
    drafting = engine(llama, 4, cycle)
    return run(drafting, *requests), run(engine(llama, 0, cycle), *requests), drafting


def same_output(a: Request, b: Request) -> bool:
    return (a.tokens, a.stop_token, a.finish_reason) == (b.tokens, b.stop_token, b.finish_reason)


# The proposer, on hand-made token lists.

def test_the_most_recent_occurrence_of_the_suffix_gives_the_draft():
    assert propose([1, 2, 3, 1, 2, 4, 9, 1, 2], k=2) == [4, 9]  # [1, 2] also follows 0 and gives [3, 1]


def test_the_longest_suffix_that_occurs_earlier_is_matched_first():
    tokens = [3, 1, 2, 7, 5, 1, 2, 8, 3, 1, 2]
    assert propose(tokens, k=1) == [7]  # [3, 1, 2]; the more recent [1, 2] would give [8]
    assert propose(tokens, k=1, max_ngram=2) == [8]


def test_a_draft_has_at_most_k_tokens_and_ends_with_the_text():
    tokens = [5, 6, 7, 8, 9, 5, 6]
    assert propose(tokens, k=2) == [7, 8]
    assert propose(tokens, k=10) == [7, 8, 9, 5, 6]


def test_no_earlier_occurrence_no_draft():
    assert propose([1, 2, 3, 4], k=4) == []
    assert propose([1, 5, 2, 1], k=4) == []  # one token alone is not matched by default
    assert propose([1, 5, 2, 1], k=4, min_ngram=1) == [5, 2, 1]
    assert propose([7], k=4) == []


# The acceptance rule.

def test_greedy_keeps_the_confirmed_draft_and_the_models_pick_after_it():
    logits = torch.full((4, 5), -1.0)
    logits[torch.arange(4), torch.tensor([3, 1, 4, 2])] = 1.0  # the argmax at each position
    assert verify(logits, [3, 1, 0], 0, 1.0, None) == [3, 1, 4]  # rejected at its third token: the model's 4
    assert verify(logits, [3, 1, 4], 0, 1.0, None) == [3, 1, 4, 2]  # all accepted, then the bonus token
    assert verify(logits[:1], [], 0, 1.0, None) == [3]


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.7)])
def test_sampled_acceptance_keeps_the_models_distribution(temperature, top_p):
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = (p.log() * temperature)[None].repeat(2, 1)  # divided by the temperature, these give back p
    target = p if top_p == 1 else torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8  # the nucleus: 0.5 + 0.3 reaches 0.7
    generator, trials, draft = torch.Generator().manual_seed(0), 20000, [1]
    outcomes = [verify(logits, draft, temperature, top_p, generator) for _ in range(trials)]
    accepted = [kept for kept in outcomes if len(kept) == 2]
    # Draft token x is accepted with probability p(x) (binomial standard deviation below 0.0035 here).
    assert len(accepted) / trials == pytest.approx(target[1].item(), abs=0.015)
    # A rejection picks from p with x removed, renormalised: never x.
    rejected = torch.bincount(torch.tensor([kept[0] for kept in outcomes if len(kept) == 1]), minlength=4)
    assert rejected[1] == 0
    expected = target.clone()
    expected[1] = 0
    assert (rejected / rejected.sum()).tolist() == pytest.approx((expected / expected.sum()).tolist(), abs=0.02)
    # After an accepted draft, the bonus token is drawn from p.
    bonus = torch.bincount(torch.tensor([kept[1] for kept in accepted]), minlength=4)
    assert (bonus / bonus.sum()).tolist() == pytest.approx(target.tolist(), abs=0.03)


# The engine: the same output as without prompt lookup.

def test_greedy_output_is_unchanged_and_drafts_are_accepted(llama):
    prompt = [BOS, A, B, C, D, A, B, C, D, A, B, 7, 8, 9]  # after 9 the model's own picks lead back to the cycle?
    requests = [([BOS, A, B, C, D, A, B], GREEDY), (prompt, GREEDY)]
    drafted, plain, drafting = with_and_without(llama, *requests)
    assert all(same_output(a, b) for a, b in zip(drafted, plain))
    stats = drafting.stats
    assert stats.accepted_tokens >= 8 and stats.drafts < stats.accepted_tokens  # several tokens a step
    assert max(drafting.forward.widths) > 1


def test_partly_accepted_drafts_give_the_same_greedy_and_seeded_sampled_tokens(llama):
    # logit_bias keeps the model's picks among five tokens, chosen by its own logits: drafts often fail.
    bias = {t: 30.0 for t in (A, B, C, D, 1004)}
    prompt = [BOS, A, B, C, A, B, D, A, B, C, 1004, A, B]
    requests = [(prompt, SamplingParams(max_tokens=40, temperature=0, logit_bias=bias)),
                (prompt, SamplingParams(max_tokens=40, temperature=1.0, top_p=0.95, seed=5, logit_bias=bias))]
    drafted, plain, drafting = with_and_without(llama, *requests, cycle=[1005, 1006])  # not steered
    assert all(same_output(a, b) for a, b in zip(drafted, plain))
    stats = drafting.stats
    assert 0 < stats.accepted_tokens < stats.draft_tokens


def test_continuous_batching_at_different_positions(llama):
    drafting, plain = engine(llama, 4), engine(llama, 0)
    results = []
    for e in (drafting, plain):
        first = e.submit([BOS, A, B, C, D, A], SamplingParams(max_tokens=30, temperature=0))
        e.step()
        e.step()
        second = e.submit([BOS, 5, 6, 7, 8, 9, 10, 11, 12, C], GREEDY)
        e.step()
        third = e.submit([BOS] + [20 + i for i in range(45)] + [D], GREEDY)  # near the end of the context
        while e.step():
            pass
        results.append([first, second, third])
    assert all(same_output(a, b) for a, b in zip(*results))
    assert drafting.stats.accepted_tokens > 0


def test_logprobs_of_accepted_tokens_are_those_of_their_positions(llama):
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    [drafted], [plain], drafting = with_and_without(llama, ([BOS, A, B, C, D, A], params))
    assert drafted.tokens == plain.tokens and drafting.stats.accepted_tokens > 0
    assert drafted.logprobs == pytest.approx(plain.logprobs, abs=1e-4)
    for mine, theirs in zip(drafted.top_logprobs, plain.top_logprobs, strict=True):
        assert [t for t, _ in mine] == [t for t, _ in theirs]
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], abs=1e-4)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 6, 7])
def test_max_tokens_cuts_a_draft_and_ends_the_sequence_exactly(llama, max_tokens):
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    [drafted], [plain], drafting = with_and_without(llama, ([BOS, A, B, C, D, A, B], params))
    assert same_output(drafted, plain) and len(drafted.tokens) == max_tokens
    assert drafted.finish_reason == "length"
    # The prompt's step gives the first token; the first draft (up to 4) leaves room for the pick after it.
    assert drafting.stats.draft_tokens == drafting.stats.accepted_tokens == min(4, max(0, max_tokens - 2))


def test_a_stop_token_accepted_in_a_draft_ends_the_sequence_there(llama):
    cycle = [A, B, C, EOT]
    [drafted], [plain], drafting = with_and_without(llama, ([BOS, A, B, C, EOT, A, B, C, EOT, A, B], GREEDY),
                                                    cycle=cycle)
    # The prompt's step gives C; the draft [EOT, A, B, C] is confirmed whole, but nothing after EOT counts.
    assert drafted.tokens == [C] and drafted.stop_token == EOT and same_output(drafted, plain)
    assert drafting.stats.drafts == 1 and drafting.stats.accepted_tokens == 1


def test_a_sequence_drafting_to_the_end_of_the_context_ends_there(llama):
    params = SamplingParams(max_tokens=100, temperature=0)
    prompt = [BOS, A, B, C, D, A, B, C, D, A]
    drafted, plain, drafting = with_and_without(llama, (prompt, params), (prompt[:6], params))
    assert all(same_output(a, b) for a, b in zip(drafted, plain))
    assert all(s.finish_reason == "length" and len(s.prompt_tokens) + len(s.tokens) == 64 for s in drafted)
    assert drafting.stats.accepted_tokens > 40


def test_sequences_with_a_grammar_or_penalties_do_not_draft(llama):
    from llama.grammar import json_object_grammar

    prompt = [BOS, A, B, C, D, A, B]
    requests = [(prompt, SamplingParams(max_tokens=10, temperature=0, frequency_penalty=0.5)),
                (prompt, SamplingParams(max_tokens=10, temperature=0, presence_penalty=-0.5)),
                (prompt, SamplingParams(max_tokens=10, temperature=0, grammar=json_object_grammar()))]
    drafted, plain, drafting = with_and_without(llama, *requests)
    assert all(same_output(a, b) for a, b in zip(drafted, plain))
    assert drafting.stats.drafts == 0 and max(drafting.forward.widths[3:]) == 1
    assert run(drafting, (prompt, GREEDY))[0] and drafting.stats.accepted_tokens > 0  # a plain one drafts


# The library.

def test_the_library_and_its_streams_give_the_same_text_with_prompt_lookup(llama, build_tiny, monkeypatch):
    drafting = build_tiny(max_seq_len=64, max_batch_size=4, prompt_lookup=4)
    for model in (llama, drafting):
        monkeypatch.setattr(model.engine, "forward", Follow(model.model, [A, B, C, D]))
    prompts = [[BOS, A, B, C, D, A], [BOS, 5, 6, 7, A, B]]
    assert drafting.generate(prompts, max_gen_len=16, temperature=0) == llama.generate(prompts, 16, temperature=0)
    text = llama.tokenizer.decode([A, B, C, D, A, B, C])
    expected = llama.text_completion([text], temperature=0.8, max_gen_len=20)
    assert drafting.text_completion([text], temperature=0.8, max_gen_len=20) == expected
    assert "".join(drafting.stream_completion(text, temperature=0, max_gen_len=20)) == llama.text_completion(
        [text], temperature=0, max_gen_len=20)[0]["generation"]
    assert drafting.engine.stats.accepted_tokens > 20


def test_prompt_lookup_is_checked_at_build(build_tiny):
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"prompt_lookup must be an integer >= 0 or None, got"):
            build_tiny(max_seq_len=64, max_batch_size=1, prompt_lookup=bad)


def test_prompt_lookup_is_on_by_default_for_eager_cpu_decoding_and_0_turns_it_off(build_tiny):
    assert build_tiny(max_seq_len=64, max_batch_size=1).engine.lookup.k == 8
    assert build_tiny(max_seq_len=64, max_batch_size=1, prompt_lookup=3).engine.lookup.k == 3
    assert build_tiny(max_seq_len=64, max_batch_size=1, prompt_lookup=0).engine.lookup is None


def test_the_server_takes_prompt_lookup_as_a_flag(tiny_checkpoint, monkeypatch, capsys):
    serve = importlib.import_module("llama.serve.__main__")
    monkeypatch.setattr(sys, "argv", ["llama.serve", "--help"])
    with pytest.raises(SystemExit):
        serve.run(serve.main, "llama.serve")
    help_text = capsys.readouterr()
    assert "--prompt_lookup" in help_text.out + help_text.err
    monkeypatch.setattr(sys, "argv", ["llama.serve", "--ckpt_dir", str(tiny_checkpoint(1)), "--prompt_lookup", "-2"])
    with pytest.raises(SystemExit) as exit:
        serve.run(serve.main, "llama.serve")
    stderr = capsys.readouterr().err
    assert exit.value.code == 2 and stderr.startswith("error: ") and "prompt_lookup must be an integer >= 0" in stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
