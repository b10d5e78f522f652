"""Constrained decoding and sampling controls, per sequence in the engine: a grammar (llguidance) masks each
constrained sequence's logits row, so constrained and free sequences share decode steps; logit_bias and the
presence and frequency penalties change the logits before every pick, greedy ones too.

The model is the tiny random float32 checkpoint with the real Llama 3 tokenizer: random weights put the grammar
to the test, since nothing but the mask keeps the output valid. SmolLM2 checks a GGUF vocabulary on a real model.
"""

import json
import math
import subprocess
import sys
import threading

import pytest
import torch

from llama import Llama
from llama.engine import Engine, SamplingParams
from llama.grammar import json_object_grammar, json_schema_grammar, tool_call_grammar
from llama.logits_processing import apply_masks, apply_penalties
from engine_worker import serve_constrained
from test_engine import engine, run
from test_torchrun import ROOT, torchrun
from test_gguf_smollm2 import checkpoint, smollm2_gguf  # noqa: F401  (SmolLM2's fixtures, fetched once)

pytest.importorskip("llguidance", reason="constrained decoding needs llguidance (the test extra installs it)")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 18, "maximum": 99},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "place": {
            "type": "object",
            "properties": {"x": {"type": "integer", "minimum": -3, "maximum": 3}, "ok": {"type": "boolean"}},
            "required": ["x", "ok"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "color", "tags", "place"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer",
    "minimum": 1, "maximum": 7}}, "required": ["city", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def llama(build_tiny) -> Llama:
    return build_tiny(max_seq_len=256, max_batch_size=4)


def prompt(llama: Llama) -> list[int]:
    return llama.tokenizer.encode("Answer in JSON:", bos=True, eos=False)


def conforms(value, schema: dict) -> bool:
    """Whether `value` satisfies `schema`, for the keywords these tests use (and jsonschema agrees, if installed)."""
    try:
        import jsonschema

        jsonschema.validate(value, schema)
    except ImportError:
        pass
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "integer":
        return type(value) is int and schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", math.inf)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "array":
        return (isinstance(value, list) and len(value) <= schema.get("maxItems", math.inf)
                and all(conforms(item, schema["items"]) for item in value))
    return (isinstance(value, dict) and set(schema["required"]) <= value.keys() <= schema["properties"].keys()
            and all(conforms(value[key], schema["properties"][key]) for key in value))


def whitespace_outside_strings(text: str) -> bool:
    inside = escaped = False
    for char in text:
        if inside:
            inside, escaped = (escaped or char != '"'), (not escaped and char == "\\")
        elif char == '"':
            inside = True
        elif char.isspace():
            return True
    return False


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_schema_constrained_sequences_finish_with_a_stop_token_and_valid_compact_json(llama, temperature):
    grammar = json_schema_grammar(PERSON)
    sequences = run(engine(llama), *[(prompt(llama), SamplingParams(max_tokens=200, temperature=temperature,
                                                                     seed=seed, grammar=grammar))
                                     for seed in range(3)])
    for sequence in sequences:
        text = llama.tokenizer.decode(sequence.tokens)
        assert sequence.finish_reason == "stop" and sequence.stop_token in llama.tokenizer.stop_tokens, text
        assert conforms(json.loads(text), PERSON), text
        assert not whitespace_outside_strings(text), text


def test_any_json_object(llama):
    sequence = run(engine(llama), (prompt(llama), SamplingParams(max_tokens=40, temperature=0,
                                                                 grammar=json_object_grammar())))[0]
    text = llama.tokenizer.decode(sequence.tokens)
    assert text.startswith("{") and not whitespace_outside_strings(text)
    if sequence.finish_reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_constrained_and_free_sequences_share_decode_steps(llama):
    free_params = SamplingParams(max_tokens=12, temperature=0)
    free_alone = run(engine(llama), (prompt(llama), free_params))[0].tokens
    e = engine(llama)
    constrained, free = run(e, (prompt(llama), SamplingParams(max_tokens=60, temperature=0,
                                                              grammar=json_schema_grammar(PERSON))),
                            (prompt(llama), free_params))
    assert any(kind == "decode" and len(positions) == 2 for kind, positions, *_ in e.forward.calls)
    assert free.tokens == free_alone
    assert conforms(json.loads(llama.tokenizer.decode(constrained.tokens)), PERSON)


@pytest.mark.parametrize("overlap", [True, False])
def test_masks_are_ready_for_the_logits_and_computed_meanwhile_where_that_pays(llama, monkeypatch, overlap):
    """With `overlap` (beside an accelerator, or a CPU forward on fewer threads than cores) each step's masks are
    computed in another thread while the forward pass runs; without, in the engine's thread just before it."""
    e = engine(llama)
    e.processing.overlap = overlap
    vocabulary = e.processing.vocabulary()
    computing, started, in_engine_thread = threading.Event(), [], []
    masks, step = vocabulary.masks, e.forward

    def recorded_masks(matchers, threads=None):
        in_engine_thread.append(threading.current_thread() is threading.main_thread())
        computing.set()
        return masks(matchers, threads)

    def forward(*args, **kwargs):
        started.append(computing.wait(timeout=10))  # the step's masks began before or while it runs
        computing.clear()
        return step(*args, **kwargs)

    monkeypatch.setattr(vocabulary, "masks", recorded_masks)  # the vocabulary is shared: undone after the test
    e.forward = forward
    sequence = run(e, (prompt(llama), SamplingParams(max_tokens=60, temperature=0,
                                                     grammar=json_schema_grammar(PERSON))))[0]
    assert sequence.finish_reason == "stop" and len(started) == len(sequence.tokens) + 1 and all(started)
    assert in_engine_thread == [not overlap] * len(started)


def test_a_grammar_that_cannot_finish_within_max_tokens_ends_with_length(llama):
    sequence = run(engine(llama), (prompt(llama), SamplingParams(max_tokens=5, temperature=0,
                                                                 grammar=json_schema_grammar(PERSON))))[0]
    assert sequence.finish_reason == "length" and len(sequence.tokens) == 5
    assert llama.tokenizer.decode(sequence.tokens).startswith('{"')


def test_a_schema_llguidance_cannot_compile_is_refused_naming_the_part():
    with pytest.raises(ValueError, match=r'schema at /properties/place/properties/x cannot be compiled: .*"not"'):
        json_schema_grammar({"type": "object", "properties": {"place": {"type": "object", "properties": {
            "x": {"not": {"type": "string"}}}}}})
    with pytest.raises(ValueError, match=r"schema at /properties/when cannot be compiled: Unknown format"):
        json_schema_grammar({"type": "object", "properties": {"when": {"type": "string", "format": "moonphase"}}})
    with pytest.raises(ValueError, match=r"tools\[1\].function.parameters at /properties/n cannot be compiled"):
        tool_call_grammar([WEATHER, {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"n": {"type": "integer", "uniqueItems": True}}}}}])
    with pytest.raises(ValueError, match=r"tools\[0\] must be"):
        tool_call_grammar([{"type": "function"}])


def test_a_grammar_the_vocabulary_cannot_use_is_refused_before_any_work(llama):
    e = engine(llama)
    bad = 'start: <|no_such_token|> "x"'
    with pytest.raises(ValueError, match="grammar cannot be used: .*unknown special token"):
        e.submit(prompt(llama), SamplingParams(max_tokens=4, grammar=bad))
    assert not e.step() and e.forward.calls == []


def test_without_llguidance_the_helpers_say_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "llguidance", None)
    with pytest.raises(ImportError, match=r'llguidance: pip install -e "\.\[serve\]"'):
        json_object_grammar()
    code = "import sys, llama, llama.engine; print('llguidance' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("python_tag", [False, True])
def test_a_forced_tool_call_is_meta_json_with_valid_parameters(llama, python_tag):
    tokenizer = llama.tokenizer
    # The bias makes <|python_tag|> the first pick where the grammar allows it; the mask forbids it afterwards.
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=5, logit_bias={tokenizer.python_tag_id: 100},
                            grammar=tool_call_grammar([WEATHER, TIME], python_tag=python_tag))
    sequence = run(engine(llama), (prompt(llama), params))[0]
    assert sequence.finish_reason == "stop"
    assert (sequence.tokens[0] == tokenizer.python_tag_id) == python_tag
    call = json.loads(tokenizer.decode(sequence.tokens[1:] if python_tag else sequence.tokens))
    tool = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]["function"]
    assert list(call) == ["name", "parameters"] and conforms(call["parameters"], tool["parameters"])


def test_logit_bias_forces_and_forbids_tokens(llama):
    e = engine(llama)
    free = run(e, (prompt(llama), SamplingParams(max_tokens=6, temperature=0)))[0].tokens
    token = llama.tokenizer.encode(" yes", bos=False, eos=False)[0]
    forced, forbidden, sampled = run(
        e, (prompt(llama), SamplingParams(max_tokens=6, temperature=0, logit_bias={token: 100})),
        (prompt(llama), SamplingParams(max_tokens=6, temperature=0, logit_bias={t: -100 for t in free})),
        (prompt(llama), SamplingParams(max_tokens=6, temperature=1.0, seed=3, logit_bias={token: 100})))
    assert forced.tokens == sampled.tokens == [token] * 6
    assert not set(forbidden.tokens) & set(free)


class FixedLogits:
    """A step function whose every row's logits are `row` (the model's shapes, none of its numbers)."""

    def __init__(self, row: torch.Tensor):
        self.row = row

    def __call__(self, tokens, start_pos, slot=0, kv_len=None, last_logits_only=False):
        rows, length = tokens.shape
        return self.row.expand(rows, 1 if last_logits_only else length, -1).clone()


def test_penalties_change_picks_as_openai_defines_them(llama):
    logits = {11: 10.0, 22: 9.5, 33: 9.2, 44: 9.0}
    row = torch.full((llama.model.args.vocab_size,), -1e4)
    row[list(logits)] = torch.tensor(list(logits.values()))
    presence, frequency, bias = 0.3, 0.4, {44: 0.5}
    expected: list[int] = []
    for _ in range(10):  # by hand: the bias, then each token loses presence once and frequency per occurrence
        value = {t: v + bias.get(t, 0) - (expected.count(t) and presence + frequency * expected.count(t))
                 for t, v in logits.items()}
        expected.append(max(value, key=value.get))
    e = Engine(llama.model, llama.tokenizer, torch.Generator(), forward=FixedLogits(row))
    sequence = run(e, ([1, 2], SamplingParams(max_tokens=10, temperature=0, presence_penalty=presence,
                                             frequency_penalty=frequency, logit_bias=bias)))[0]
    assert sequence.tokens == expected and len(set(expected)) == 4


def test_penalties_and_masks_on_known_logits():
    row = torch.tensor([1.0, 2.0, 3.0, 4.0])
    apply_penalties(row, [3, 1, 3, 3], presence=0.5, frequency=0.25)
    assert row.tolist() == [1.0, 2.0 - 0.75, 3.0, 4.0 - 1.25]
    masks = torch.tensor([[0b101, 1 << 30], [-1, 1]], dtype=torch.int32)  # tokens 0, 2, 62; the first 33
    masked = apply_masks(torch.arange(70.0).expand(2, 70), masks)  # 70 logits, 64 bits: 64..69 are not allowed
    assert masked[0].isfinite().nonzero().flatten().tolist() == [0, 2, 62] and masked[0, 62] == 62
    assert masked[1].isfinite().sum() == 33 and torch.equal(masked[1, :33], torch.arange(33.0))


def test_smollm2_gguf_vocabulary_answers_a_schema(checkpoint):
    """A real model with a GGUF vocabulary (llama.bpe) under a schema, greedy, in its own chat format."""
    generator = Llama.build(checkpoint, device="cpu", dtype=torch.float32, max_seq_len=512,
                            max_batch_size=1)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
              "country": {"type": "string", "maxLength": 20}}, "required": ["city", "country"],
              "additionalProperties": False}
    dialog = [{"role": "user", "content": "What is the capital of France? Answer in JSON with city and country."}]
    tokens = generator.formatter.encode_dialog_prompt(dialog)
    sequence = run(generator.engine, (tokens, SamplingParams(max_tokens=40, temperature=0,
                                                             grammar=json_schema_grammar(schema))))[0]
    text = generator.tokenizer.decode(sequence.tokens)
    assert sequence.finish_reason == "stop" and sequence.stop_token in generator.tokenizer.stop_tokens, text
    answer = json.loads(text)
    assert conforms(answer, schema) and "Paris" in answer["city"], text


def test_under_torchrun_rank_0_constrains_while_rank_1_follows(build_tiny, tiny_checkpoint, tmp_path):
    out = tmp_path / "constrained.pt"
    torchrun(ROOT / "tests" / "engine_worker.py", str(out), str(tiny_checkpoint(2)), "--job=constrained", nproc=2)
    served = torch.load(out, weights_only=True)
    assert served == serve_constrained(build_tiny(max_seq_len=64, max_batch_size=2, seed=1))
    assert served["finish_reasons"] == ["stop", "length"]


def check_person(value: dict) -> None:
    assert set(value) == set(PERSON["required"]) and len(value["name"]) <= 6 and 18 <= value["age"] <= 99
    assert value["color"] in ("red", "green", "blue") and len(value["tags"]) <= 2
    assert -3 <= value["place"]["x"] <= 3 and isinstance(value["place"]["ok"], bool)


def test_chat_completion_and_stream_chat_take_a_response_format(llama):
    dialog = [{"role": "user", "content": "A person, please."}]
    schema = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    [reply] = llama.chat_completion([dialog], temperature=0, max_gen_len=200, response_format=schema)
    check_person(json.loads(reply["generation"]["content"]))
    streamed = llama.stream_chat(dialog, temperature=0, max_gen_len=200, response_format=schema)
    assert "".join(streamed) == reply["generation"]["content"]
    for _ in range(3):  # with tools: a call of one of them, or the JSON
        [reply] = llama.chat_completion([dialog], temperature=1.0, max_gen_len=200, tools=[WEATHER],
                                        response_format=schema)
        message = reply["generation"]
        if message.get("tool_calls"):
            [call] = message["tool_calls"]
            assert call["name"] == "get_weather" and 1 <= call["arguments"]["days"] <= 7
        else:
            check_person(json.loads(message["content"]))
    with pytest.raises(ValueError, match="response_format must be"):
        llama.chat_completion([dialog], response_format={"type": "yaml"})
    with pytest.raises(ValueError, match="response_format's schema at /properties/when cannot be compiled"):
        llama.chat_completion([dialog], response_format={"type": "json_schema", "json_schema": {"schema": {
            "type": "object", "properties": {"when": {"type": "string", "format": "moon"}}}}})
