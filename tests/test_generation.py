"""`Llama` generates what an independent implementation would, row by row, and refuses bad input clearly."""

import math

import pytest
import torch

from llama import Llama
from llama.engine import Engine
from llama.sampling import sample_top_p



@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=64, max_batch_size=4)


def _encode(llama: Llama, prompts: list[str]) -> list[list[int]]:
    return [llama.tokenizer.encode(p, bos=True, eos=False) for p in prompts]


def test_greedy_tokens_match_hf_transformers(prompts, llama, tiny_hf_model):
    for prompt in _encode(llama, prompts):
        ours, _ = llama.generate([prompt], max_gen_len=16, temperature=0)
        hf = tiny_hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert ours[0] == hf[: len(ours[0])] and len(ours[0]) > 0


def test_mixed_length_batch_gives_each_row_what_it_gives_alone(prompts, llama):
    prompts = _encode(llama, prompts)
    batch, _ = llama.generate(prompts, max_gen_len=10, temperature=0)
    for prompt, row in zip(prompts, batch):
        alone, _ = llama.generate([prompt], max_gen_len=10, temperature=0)
        assert row == alone[0]


def test_more_prompts_than_max_batch_size_are_chunked_in_order(build_tiny, llama):
    small_batch = build_tiny(max_seq_len=64, max_batch_size=2)
    prompts = [f"Item number {i} is" for i in range(5)]
    chunked = small_batch.text_completion(prompts, temperature=0, max_gen_len=6)
    assert [r["generation"] for r in chunked] == [
        llama.text_completion([p], temperature=0, max_gen_len=6)[0]["generation"] for p in prompts
    ]


def test_logprobs_are_those_of_the_returned_tokens(prompts, llama):
    prompt = _encode(llama, prompts[:1])[0]
    tokens, logprobs = llama.generate([prompt], max_gen_len=8, temperature=0, logprobs=True, echo=True)
    assert tokens[0][: len(prompt)] == prompt and len(tokens[0]) == len(prompt) + 8
    full = torch.log_softmax(llama.model(torch.tensor(tokens), 0)[0], dim=-1)
    expected = [0.0] + [full[i - 1, t].item() for i, t in enumerate(tokens[0]) if i > 0]
    assert logprobs[0] == pytest.approx(expected, abs=1e-4)

    completion = llama.text_completion(prompts[:1], temperature=0, max_gen_len=8, logprobs=True)[0]
    assert completion["logprobs"] == pytest.approx(expected[len(prompt) :], abs=1e-4)
    assert "".join(completion["tokens"]) == completion["generation"]


def test_sampling_is_reproducible_for_a_seed(prompts, build_tiny):
    def sample(seed: int) -> list[str]:
        llama = build_tiny(max_seq_len=64, max_batch_size=4, seed=seed)
        return [r["generation"] for r in llama.text_completion(prompts, temperature=1.0, top_p=0.95, max_gen_len=12)]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)


def test_top_p_samples_only_from_the_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).repeat(4000, 1)
    generator = torch.Generator().manual_seed(0)
    picks = sample_top_p(probs, 0.7, generator).flatten()
    assert set(picks.tolist()) == {0, 1}  # 0.5 < 0.7, so the token that crosses the threshold joins
    assert (picks == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.03)
    assert set(sample_top_p(probs, 0.9, generator).flatten().tolist()) == {0, 1, 2}
    assert set(sample_top_p(probs, 1.0, generator).flatten().tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("stop_name", ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"])
def test_each_sequence_stops_at_its_first_stop_token_which_is_dropped(prompts, llama, stop_name, force_tokens,
                                                                     monkeypatch):
    stop = llama.tokenizer.special_tokens[stop_name]
    prompts = _encode(llama, prompts[:2])
    # An engine that puts prompt i in slot i (row i of each step): without prefix reuse, the lowest free slots.
    monkeypatch.setattr(llama, "engine", Engine(llama.model, llama.tokenizer, llama.generator, prefix_reuse=False))
    free, _ = llama.generate(prompts, max_gen_len=10, temperature=0)
    # Both prompts are prefilled together first (call 0, giving each row its first token); then each decode step
    # gives both rows their next token, so forward call 3 gives row 1 its 4th token.
    force_tokens(llama, {3: stop}, row=1)
    stopped, _ = llama.generate(prompts, max_gen_len=10, temperature=0)
    assert stopped[1] == free[1][:3]
    assert stopped[0] == free[0]


def test_generation_ends_early_once_every_sequence_has_stopped(prompts, llama, force_tokens):
    forced = force_tokens(llama, {1: llama.tokenizer.eot_id})
    tokens, _ = llama.generate(_encode(llama, prompts[:1]), max_gen_len=30, temperature=0)
    assert tokens == [[tokens[0][0]]] and forced.calls == 2


def test_chat_reply_marks_a_tool_call(llama, force_tokens):
    dialog = [{"role": "system", "content": "Environment: ipython"}, {"role": "user", "content": "2 + 2?"}]
    free = llama.chat_completion([dialog], temperature=0, max_gen_len=4)[0]["generation"]
    assert free["role"] == "assistant" and "eom" not in free and "python_tag" not in free

    force_tokens(llama, {0: llama.tokenizer.python_tag_id, 3: llama.tokenizer.eom_id})
    reply = llama.chat_completion([dialog], temperature=0, max_gen_len=10)[0]["generation"]
    assert reply["python_tag"] is True and reply["eom"] is True
    assert "<|python_tag|>" not in reply["content"] and len(llama.tokenizer.encode(reply["content"], bos=False, eos=False)) >= 1
    # The reply goes back into the dialog as it is, followed by the tool's result.
    prompt = llama.formatter.encode_dialog_prompt([*dialog, reply, {"role": "ipython", "content": "4"}])
    assert llama.tokenizer.python_tag_id in prompt and llama.tokenizer.eom_id in prompt


def test_max_gen_len_none_runs_to_max_seq_len(prompts, llama):
    prompt = _encode(llama, prompts[:1])
    up_to_max_seq_len, _ = llama.generate(prompt, max_gen_len=64 - len(prompt[0]), temperature=0)
    capped, _ = llama.generate(prompt, max_gen_len=1000, temperature=0)
    assert capped == up_to_max_seq_len
    result = llama.text_completion(prompts[:1], temperature=0, max_gen_len=None)[0]["generation"]
    assert result == llama.tokenizer.decode(capped[0])


def test_empty_input_gives_empty_output(llama):
    assert llama.text_completion([]) == []
    assert llama.chat_completion([]) == []
    assert llama.generate([], max_gen_len=4) == ([], None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"max_gen_len": -1}, "max_gen_len"),
        ({"max_gen_len": 2.5}, "max_gen_len"),
        ({"prompt_tokens": [[1, 2, 128256]]}, r"outside \[0, 128256\)"),
        ({"prompt_tokens": [[1, -5]]}, "outside"),
        ({"prompt_tokens": [[]]}, "prompt 0 is empty"),
        ({"prompt_tokens": [[1]] + [[1] * 65]}, "prompt 1 has 65 tokens; at most 64 fit in max_seq_len=64"),
        ({"prompt_tokens": [[1, 2.5]]}, "prompt 0 has a token id that is not an integer: 2.5"),
        ({"prompt_tokens": [1, 2, 3]}, "prompt 0 must be a list of token ids, got int"),
    ],
)
def test_bad_generate_arguments(llama, kwargs, message):
    arguments = {"prompt_tokens": [[128000, 9906]], "max_gen_len": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        llama.generate(**arguments)


def test_bad_completion_arguments(llama):
    with pytest.raises(ValueError, match="list of str"):
        llama.text_completion("just one string")
    with pytest.raises(ValueError, match="dialog 1: message 0 has role 'robot'"):
        llama.chat_completion([[{"role": "user", "content": "hi"}], [{"role": "robot", "content": "hi"}]])
    with pytest.raises(ValueError, match="fit in max_seq_len=64"):
        llama.text_completion(["word " * 100])
