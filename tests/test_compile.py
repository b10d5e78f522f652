"""`Llama.build(..., compile=True)` decodes through torch.compile and produces what eager decoding produces.

Runs on the CPU, and on CUDA too where a GPU is present (there the step is replayed as a CUDA graph).
"""

import pytest
import torch

import llama.kernels
from llama import Llama, int8_cpu
from llama.kernels import Int8Linear, PackedLinear

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@torch.inference_mode()
def step(llama: Llama, tokens: torch.Tensor, start_pos: int) -> torch.Tensor:
    """The last position's logits of `tokens` (rows, seqlen) at `start_pos` of KV slots [0, rows), through the
    engine's step function: the model's own, or compiled decoding."""
    starts = torch.full((tokens.shape[0],), start_pos, device=tokens.device)
    return llama.engine.forward(tokens, starts, kv_len=start_pos + tokens.shape[1], last_logits_only=True)


@pytest.fixture(scope="module", params=DEVICES)
def eager_and_compiled(request, tiny_checkpoint) -> tuple[Llama, Llama]:
    def build(compile: bool) -> Llama:
        return Llama.build(tiny_checkpoint(1), device=request.param, dtype=torch.float32, max_seq_len=64,
                           max_batch_size=3, compile=compile)

    return build(False), build(True)


def test_greedy_tokens_equal_eager_for_mixed_lengths_and_batch_sizes(prompts, eager_and_compiled):
    eager, compiled = eager_and_compiled
    prompts = [eager.tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    for batch in (prompts, prompts[2:]):  # rows of different lengths; then another batch size (a new compile)
        expected, _ = eager.generate(batch, max_gen_len=20, temperature=0)
        assert compiled.generate(batch, max_gen_len=20, temperature=0)[0] == expected
        assert compiled.generate(batch, max_gen_len=20, temperature=0)[0] == expected  # replays, not recordings


def test_later_calls_of_any_length_do_not_compile_again(prompts, eager_and_compiled):
    _, compiled = eager_and_compiled
    prompt = compiled.tokenizer.encode(prompts[0], bos=True, eos=False)
    compiled.generate([prompt], max_gen_len=3, temperature=0)  # compiled (or already was) for batch size 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt_len, max_gen_len in ((2, 5), (6, 17), (len(prompt), 30)):
            compiled.generate([prompt[:prompt_len]], max_gen_len=max_gen_len, temperature=0)


def test_decode_step_logits_match_eager(eager_and_compiled):
    eager, compiled = eager_and_compiled
    tokens = torch.tensor([[128000, 791, 6864, 315, 9822, 374, 12366]], device=eager.device)
    outputs = []
    for llama in (eager, compiled):
        step(llama, tokens[:, :5], 0)
        first = step(llama, tokens[:, 5:6], 5)
        second = step(llama, tokens[:, 6:7], 6)
        outputs.append((first, second))
    (eager_first, eager_second), (compiled_first, compiled_second) = outputs
    assert compiled_first.shape == (1, 1, eager.model.args.vocab_size)
    # The first output must survive the second step (a CUDA graph reuses its output buffer).
    torch.testing.assert_close(compiled_first, eager_first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(compiled_second, eager_second, rtol=1e-4, atol=1e-4)
    assert not torch.equal(compiled_first, compiled_second)


def test_sampled_text_and_streams_equal_eager(prompts, eager_and_compiled):
    eager, compiled = eager_and_compiled
    for llama in (eager, compiled):
        llama.generator.manual_seed(7)
    expected = eager.text_completion(prompts, temperature=1.0, top_p=0.95, max_gen_len=12)
    assert compiled.text_completion(prompts, temperature=1.0, top_p=0.95, max_gen_len=12) == expected
    streamed = "".join(compiled.stream_completion(prompts[0], temperature=0, max_gen_len=12))
    assert streamed == eager.text_completion(prompts[:1], temperature=0, max_gen_len=12)[0]["generation"]


def test_compile_must_be_a_bool(tiny_checkpoint):
    with pytest.raises(ValueError, match="compile must be True or False"):
        Llama.build(tiny_checkpoint(1), device="cpu", compile="yes")


def test_cpu_bfloat16_compiled_steps_use_the_one_packed_copy_of_the_weights(tiny_checkpoint, monkeypatch):
    """The compiled step calls the layers' oneDNN-packed weights (it freezes no copy of its own) and gives eager's
    logits, up to the rounding of the bfloat16 work that inductor fuses. (Where llama.bf16_cpu's kernel cannot
    run: no AVX-512 BF16.)"""
    monkeypatch.setattr(llama.kernels.bf16_cpu, "available", lambda: False)
    built = {compile: Llama.build(tiny_checkpoint(1), device="cpu", dtype=torch.bfloat16, max_seq_len=32,
                                  max_batch_size=2, compile=compile) for compile in (False, True)}
    compiled = built[True]
    packed = [m for m in compiled.model.modules() if isinstance(m, PackedLinear)]
    assert len(packed) == 2 * 4 + 1
    matrices = [name for name, p in compiled.model.named_parameters() if p.dim() == 2 and p.device.type != "meta"]
    assert matrices == ["tok_embeddings.weight"]  # every other matrix lives only in its packed copy
    calls = []
    original = llama.kernels.packed_linear
    monkeypatch.setattr(llama.kernels, "packed_linear", lambda *args: calls.append(args[1]) or original(*args))
    tokens = torch.tensor([[128000, 791, 6864, 315, 9822, 374]])
    outputs = []
    for model in (built[False], compiled):
        step(model, tokens[:, :5], 0)
        outputs.append(step(model, tokens[:, 5:6], 5))
    assert sorted(set(calls)) == sorted(p.key for p in packed)  # traced once, through every layer's own weight
    eager, compiled_logits = outputs
    assert (compiled_logits - eager).abs().max().item() <= 2e-2 * eager.abs().max().item()


@pytest.mark.skipif(not int8_cpu.available(), reason="the int8 CPU kernel needs x86 AVX-512 VNNI")
def test_cpu_int8_compiled_steps_call_the_int8_kernel_on_the_packed_weights(tiny_checkpoint, monkeypatch):
    """Compiled code reaches the int8 layers' kernel through its operator, with their packed weights, and computes
    the same model as eager: against the int8 model in float32, its bfloat16 step errs no more than eager's.
    (Not a fixed tolerance: a bfloat16 rounding that moves an activation across an int8 step moves a logit by
    that step's weight.)"""
    def build(dtype: torch.dtype, compile: bool) -> Llama:
        return Llama.build(tiny_checkpoint(1), device="cpu", dtype=dtype, max_seq_len=32, max_batch_size=2,
                           quantize="int8", compile=compile)

    models = {"float32": build(torch.float32, False), "eager": build(torch.bfloat16, False),
              "compiled": build(torch.bfloat16, True)}
    calls = []
    original = int8_cpu.int8_linear
    monkeypatch.setattr(int8_cpu, "int8_linear", lambda *args: calls.append(args[1]) or original(*args))
    tokens = torch.tensor([[128000, 791, 6864, 315, 9822, 374]])
    logits = {}
    for name, model in models.items():
        step(model, tokens[:, :5], 0)
        logits[name] = step(model, tokens[:, 5:6], 5)
    layers = [m for m in models["compiled"].model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 4 + 1
    assert {id(packed) for packed in calls} == {id(m.packed) for m in layers}  # traced through every layer
    error = {name: (logits[name] - logits["float32"]).abs().max().item() for name in ("eager", "compiled")}
    assert 0 < error["compiled"] <= 1.5 * error["eager"]
