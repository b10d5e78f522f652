"""int8 weight-only quantization computes with exactly the dequantized weights and stays close to the original."""

import pytest
import torch

from llama import Llama
from llama.kernels import Int8Linear


def _build(tiny_checkpoint, dtype=torch.float32, **kwargs) -> Llama:
    return Llama.build(tiny_checkpoint(1), max_seq_len=64, max_batch_size=2, device="cpu", dtype=dtype, **kwargs)


@pytest.fixture(scope="module")
def tokens(tokenizer):
    prompts = ["Quantized weights should", "keep the logits close to the original ones"]
    encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
    length = min(len(t) for t in encoded)
    return torch.tensor([t[:length] for t in encoded])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_model_computes_with_the_dequantized_weights(tiny_checkpoint, tokens, dtype):
    quantized = _build(tiny_checkpoint, dtype, quantize="int8")
    linears = {name: m for name, m in quantized.model.named_modules() if isinstance(m, Int8Linear)}
    assert len(linears) == 2 * 4 + 1  # wqkv, wo, w13 and w2 in each layer, and the output layer
    assert all(m.weight.dtype == torch.int8 and m.scale.shape == (m.weight.shape[0],) for m in linears.values())
    assert quantized.model.tok_embeddings.weight.dtype == dtype
    assert set(quantized.model.state_dict()) == set(_build(tiny_checkpoint).model.state_dict())

    # The same model in float32 with each weight replaced by int8 value * scale, computed by plain matmuls.
    reference = _build(tiny_checkpoint)
    modules = dict(reference.model.named_modules())
    for name, module in linears.items():
        modules[name].weight.data = module.weight.float() * module.scale.float()[:, None]
    expected = reference.model(tokens, 0)
    got = quantized.model(tokens, 0)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # bfloat16 activations round at every step
    assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()


def test_int8_stays_close_to_the_unquantized_model(tiny_checkpoint, tokens):
    original = _build(tiny_checkpoint).model(tokens, 0)
    quantized = _build(tiny_checkpoint, quantize="int8").model(tokens, 0)
    relative = (quantized - original).abs().max() / original.abs().max()
    assert 0 < relative.item() < 0.05
    kl = torch.nn.functional.kl_div(quantized.log_softmax(-1), original.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    assert kl.item() < 0.01


def test_int8_generates_the_tokens_of_its_dequantized_weights(tiny_checkpoint):
    quantized = _build(tiny_checkpoint, quantize="int8")
    reference = _build(tiny_checkpoint)
    modules = dict(reference.model.named_modules())
    for name, module in quantized.model.named_modules():
        if isinstance(module, Int8Linear):
            modules[name].weight.data = module.weight.float() * module.scale.float()[:, None]
    prompts = ["Hello", "Int8 decoding goes through its own kernel"]
    expected = reference.text_completion(prompts, temperature=0, max_gen_len=8)
    assert quantized.text_completion(prompts, temperature=0, max_gen_len=8) == expected


def test_unknown_quantization_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match='quantize must be None or "int8"'):
        _build(tiny_checkpoint, quantize="int4")
