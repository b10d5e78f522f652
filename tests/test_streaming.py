"""Streaming gives, piece by piece, exactly what the batch methods return, and never a half character."""

import importlib
import random
import re
from pathlib import Path

import pytest

from llama import Llama
from llama.text_stream import TextStream, TokenDecoder

DIALOG = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=64, max_batch_size=4)


@pytest.mark.parametrize(("temperature", "top_p"), [(0.0, 0.9), (0.8, 0.7)])
def test_stream_joins_into_the_batch_result_for_the_same_seed(prompts, llama, temperature, top_p):
    for seed, prompt in enumerate(prompts[: 2 if temperature == 0 else 1]):
        llama.generator.manual_seed(seed)
        expected = llama.text_completion([prompt], temperature=temperature, top_p=top_p, max_gen_len=12)
        llama.generator.manual_seed(seed)
        stream = llama.stream_completion(prompt, temperature=temperature, top_p=top_p, max_gen_len=12)
        pieces = list(stream)
        assert "".join(pieces) == expected[0]["generation"]
        assert len(pieces) > 1 and len(stream.tokens) == 12 and stream.stop_token is None
        assert stream.prompt_tokens == llama.tokenizer.encode(prompt, bos=True, eos=False)

    llama.generator.manual_seed(5)
    expected = llama.chat_completion([DIALOG], temperature=temperature, top_p=top_p, max_gen_len=8)
    llama.generator.manual_seed(5)
    streamed = "".join(llama.stream_chat(DIALOG, temperature=temperature, top_p=top_p, max_gen_len=8))
    assert streamed == expected[0]["generation"]["content"]


def test_characters_split_over_tokens_are_held_back_until_whole(llama, force_tokens):
    text = "🦙 llama 龘 ok"
    forced = llama.tokenizer.encode(text, bos=False, eos=False)
    # The test is only meaningful if some token really holds a partial character.
    partial = [t for t in forced if "\ufffd" in llama.tokenizer.decode([t])]
    assert len(partial) >= 4
    force_tokens(llama, [*forced, llama.tokenizer.eot_id])
    stream = llama.stream_completion("Say it:", temperature=0, max_gen_len=30)
    pieces = list(stream)
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[0] == "🦙" and "龘" in pieces  # each appears only once its last byte has arrived
    assert stream.tokens == forced and stream.stop_token == llama.tokenizer.eot_id


@pytest.mark.parametrize(
    ("pieces", "expected"),
    [
        ([b"\xa6", b"\x99", b" ok"], "\ufffd\ufffd ok"),  # continuation bytes with no lead byte
        ([b"ok", b"\xf0\x9f"], "ok\ufffd"),  # the start of a 4-byte character, then the end of the text
    ],
)
def test_bytes_that_never_become_valid_are_replaced_as_in_the_batch_result(llama, force_tokens, pieces, expected):
    forced = [llama.tokenizer.model.encode_single_token(piece) for piece in pieces] + [llama.tokenizer.eot_id]
    force_tokens(llama, forced)
    batch = llama.text_completion(["Say it:"], temperature=0, max_gen_len=10)[0]["generation"]
    force_tokens(llama, forced)
    streamed = "".join(llama.stream_completion("Say it:", temperature=0, max_gen_len=10))
    assert streamed == batch == expected


def test_chat_stream_of_a_tool_call_drops_python_tag_and_reports_eom(llama, force_tokens):
    call = llama.tokenizer.encode("brave_search.call(query='x')", bos=False, eos=False)
    forced = [llama.tokenizer.python_tag_id, *call, llama.tokenizer.eom_id]
    stand_in = force_tokens(llama, forced)
    stream = llama.stream_chat(DIALOG, temperature=0, max_gen_len=30)
    assert "".join(stream) == "brave_search.call(query='x')"
    assert stream.tokens == forced[:-1] and stream.stop_token == llama.tokenizer.eom_id
    assert stand_in.calls == len(forced)  # no forward pass after the stop token


def test_stream_stops_at_max_seq_len_and_allows_zero_length(llama):
    prompt = "word " * 50
    n_prompt = len(llama.tokenizer.encode(prompt, bos=True, eos=False))
    stream = llama.stream_completion(prompt, temperature=0, max_gen_len=None)
    assert "".join(stream) == llama.text_completion([prompt], temperature=0)[0]["generation"]
    assert len(stream.tokens) == 64 - n_prompt
    assert list(llama.stream_completion(prompt, temperature=0, max_gen_len=0)) == []


def test_bad_stream_arguments_fail_at_the_call_not_on_first_use(llama):
    with pytest.raises(ValueError, match="prompt must be a str"):
        llama.stream_completion(["a list"])
    with pytest.raises(ValueError, match="temperature"):
        llama.stream_completion("hi", temperature=-1)
    with pytest.raises(ValueError, match="at most 64 fit in max_seq_len=64"):
        llama.stream_completion("word " * 100)
    with pytest.raises(ValueError, match="message 0 has role 'robot'"):
        llama.stream_chat([{"role": "robot", "content": "hi"}])


def test_pieces_of_any_token_sequence_join_into_its_decoded_text(tokenizer):
    # Tokens holding parts of characters, whole ones and stray bytes, in random orders and cut at random points.
    pool = [*tokenizer.encode("🦙 𝔘 龘 é ok", bos=False, eos=False), tokenizer.model.encode_single_token(b"\xa6")]
    generator = random.Random(0)
    for _ in range(300):
        tokens = generator.choices(pool, k=generator.randint(0, 8))
        pieces = list(TextStream(tokenizer, [tokenizer.bos_id], iter(tokens)))
        assert "".join(pieces) == tokenizer.decode(tokens)
        assert all(pieces)


def test_a_chat_decoder_skips_python_tag_only_as_the_first_token(tokenizer):
    tag, call = tokenizer.python_tag_id, tokenizer.encode("print(1)", bos=False, eos=False)

    def decoded(tokens: list[int], chat: bool) -> tuple[str, bool]:
        decoder = TokenDecoder(tokenizer, chat)
        return "".join(map(decoder.decode, tokens)) + decoder.finish(), decoder.python_tag

    assert decoded([tag, *call, tag], chat=True) == (tokenizer.decode([*call, tag]), True)
    assert decoded([*call, tag], chat=True) == (tokenizer.decode([*call, tag]), False)
    assert decoded([tag, *call], chat=False) == (tokenizer.decode([tag, *call]), False)


@pytest.mark.parametrize("script", ["example_text_completion", "example_chat_completion"])
def test_examples_stream_what_they_print_in_batch_and_end_with_the_speed(tiny_checkpoint, monkeypatch, capsys, script):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent))
    main = importlib.import_module(script).main
    outputs = {}
    for stream in (False, True):
        main(str(tiny_checkpoint(1)), temperature=0, max_seq_len=64, max_gen_len=4, device="cpu", dtype="float32",
             stream=stream)
        lines = capsys.readouterr().out.splitlines(keepends=True)
        outputs[stream] = "".join(line for line in lines if not line.startswith(("Loaded ", "> initializing")))
    assert outputs[True].startswith(outputs[False]) and outputs[False].count("=====") >= 4
    last_line = outputs[True][len(outputs[False]) :]
    assert re.fullmatch(r"\d+ prompt tokens, \d+ generated tokens in [\d.]+ s: [\d.]+ tokens/s\n", last_line)
