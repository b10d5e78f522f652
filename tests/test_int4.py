"""int4 weights (`quantize="int4"`): how values are quantized, what torch's int4 kernel computes with them, how
close the model stays to the original, and what is refused.

The references are written here from the definition (w ≈ (q - 8) * scale + zero per group of 32 input values), in
float64, apart from the kernel and the layer under test.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from llama import Llama, int4
from llama.args import PRESETS, ModelArgs
from llama.checkpoint.random_weights import write_random_checkpoint
from llama.int4 import Int4Linear, quantize_int4
from llama.kernels import weight_bytes
from llama.validation import check_quantize_shapes

GROUP = int4.GROUP_SIZE


def _build(ckpt_dir, dtype=torch.float32, **kwargs) -> Llama:
    return Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=2, device="cpu", dtype=dtype, **kwargs)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """float64 (q - 8) * scale + zero, each group of GROUP input values with its own scale and zero."""
    groups = q.double().unflatten(1, (scale.shape[1], -1))
    return ((groups - 8) * scale.double()[..., None] + zero.double()[..., None]).flatten(1)


def random_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols) * 0.02
    weight[1, :GROUP] += 0.5  # a group far off zero: its zero point carries it
    weight[2, 5] = -0.3  # an outlier: only its own group's steps grow
    weight[3, :GROUP] = 0.01  # a constant group: no range at all
    return weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_values_are_within_half_a_step_of_the_weights(dtype):
    weight = random_weight(64, 5 * GROUP).to(dtype)
    q, scale, zero = quantize_int4(weight, GROUP, dtype)
    assert q.shape == weight.shape and q.min() >= 0 and q.max() <= 15
    assert scale.shape == zero.shape == (64, 5) and scale.dtype == zero.dtype == dtype
    groups = weight.double().unflatten(1, (5, GROUP))
    span = groups.amax(-1) - groups.amin(-1)
    # The step spans the group's range in 15 steps (as stored in `dtype`); a constant group has some positive step.
    varied = span > 0
    assert torch.allclose(scale.double()[varied], span[varied] / 15, rtol=2 * torch.finfo(dtype).eps)
    assert (scale > 0).all()
    error = (weight.double() - dequantize(q, scale, zero)).unflatten(1, (5, GROUP)).abs().amax(-1)
    assert (error <= scale.double() / 2 * (1 + 1e-6)).all()
    # Asymmetric: each varied group uses the whole 0..15 range, its minimum at 0 and its maximum at 15.
    q_groups = q.unflatten(1, (5, GROUP))
    assert (q_groups.amin(-1)[varied] == 0).all() and (q_groups.amax(-1)[varied] == 15).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features, in_features", [(64, 3 * GROUP), (200, 5 * GROUP), (40, 18 * GROUP)])
def test_kernel_multiplies_by_the_dequantized_weight(dtype, rows, out_features, in_features):
    weight = random_weight(out_features, in_features, seed=rows).to(dtype)
    layer = Int4Linear(weight)
    x = torch.randn(2, rows, in_features).to(dtype)
    got = layer(x)
    expected = x.double() @ dequantize(*quantize_int4(weight, GROUP, dtype)).T
    assert got.shape == (2, rows, out_features) and got.dtype == dtype
    # float32 sums in float32. In bfloat16 the kernel rounds each dequantized weight and the result to 8 bits,
    # each within 2**-9 of the sum of |x| * |w|.
    bound = (x.double().abs() @ dequantize(*quantize_int4(weight, GROUP, dtype)).abs().T)
    rounding = {torch.float32: 1e-5, torch.bfloat16: 2**-8}[dtype]
    assert ((got.double() - expected).abs() <= rounding * bound).all()


def test_weights_quantized_in_chunks_of_rows_give_the_same_layer(monkeypatch):
    weight = random_weight(200, 3 * GROUP)  # 200 rows: three whole blocks of 64, then 8 padded to 16
    whole = Int4Linear(weight)
    monkeypatch.setattr(int4, "QUANTIZE_CHUNK_BYTES", 4 * 3 * GROUP * 64)  # 64 rows at a time
    chunked = Int4Linear(weight)
    assert torch.equal(chunked.packed, whole.packed)
    assert torch.equal(chunked.scales_and_zeros, whole.scales_and_zeros)
    assert whole.packed.shape == (208, 3 * GROUP // 2)  # half a byte a weight, rows padded to a multiple of 16


def test_int4_layers_keep_only_the_packed_weights(tiny_checkpoint):
    quantized = _build(tiny_checkpoint(1), torch.bfloat16, quantize="int4")
    linears = [m for m in quantized.model.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 2 * 4 + 1  # wqkv, wo, w13 and w2 in each layer, and the output layer
    expected = 0
    for layer in linears:
        rows, cols = layer.weight.shape
        assert layer.weight.is_meta and layer.packed.dtype == torch.uint8
        assert layer.scales_and_zeros.shape == (cols // GROUP, -(-rows // 16) * 16, 2)
        expected += layer.packed.nbytes + layer.scales_and_zeros.nbytes
    rest = sum(t.nbytes for m in quantized.model.modules() if not isinstance(m, Int4Linear)
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    assert weight_bytes(quantized.model) == expected + rest
    # No copy of a linear weight in any other dtype is left anywhere (the embedding has the output layer's shape).
    shapes = {tuple(layer.weight.shape) for layer in linears}
    tensors = [*quantized.model.named_parameters(), *quantized.model.named_buffers()]
    assert not [name for name, t in tensors if not t.is_meta and tuple(t.shape) in shapes
                and name != "tok_embeddings.weight"]
    assert set(quantized.model.state_dict()) == set(_build(tiny_checkpoint(1)).model.state_dict())


def _reference_with_dequantized_weights(ckpt_dir, dtype=torch.float32) -> Llama:
    """A float model whose linear layers hold their weights quantized to int4 and dequantized (no int4 kernel)."""
    reference = _build(ckpt_dir, dtype)
    for module in reference.model.modules():
        if isinstance(module, torch.nn.Linear):
            q, scale, zero = quantize_int4(module.weight, GROUP, module.weight.dtype)
            module.weight.data = dequantize(q, scale, zero).to(module.weight.dtype)
    return reference


def test_int4_model_computes_with_its_dequantized_weights(tiny_checkpoint, tokens):
    quantized = _build(tiny_checkpoint(1), quantize="int4")
    reference = _reference_with_dequantized_weights(tiny_checkpoint(1))
    expected = reference.model(tokens, 0)
    got = quantized.model(tokens, 0)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    prompts = ["Hello", "Int4 decoding goes through torch's kernel"]
    assert (quantized.text_completion(prompts, temperature=0, max_gen_len=8)
            == reference.text_completion(prompts, temperature=0, max_gen_len=8))


def test_int4_stays_close_to_the_unquantized_model(tiny_checkpoint, tokens):
    original = _build(tiny_checkpoint(1)).model(tokens, 0)
    int8 = _build(tiny_checkpoint(1), quantize="int8").model(tokens, 0)
    quantized = _build(tiny_checkpoint(1), quantize="int4").model(tokens, 0)

    def kl(logits):
        return F.kl_div(logits.log_softmax(-1), original.log_softmax(-1), log_target=True, reduction="batchmean")

    # A group of 32 normal values spans about 4 deviations, so a step is about a quarter of one and the rounding
    # noise about 8 % of the weights' size: the logits keep a correlation above 0.97 (0.988 when written). int8's
    # steps are about 14 times finer, so its KL divergence is far smaller (90 times when written; 10 asserted).
    correlation = torch.corrcoef(torch.stack([quantized.flatten(), original.flatten()]))[0, 1].item()
    assert correlation > 0.97
    assert 0 < kl(quantized).item() < 0.2
    assert 10 * kl(int8).item() < kl(quantized).item()


def test_devices_without_an_int4_kernel_are_refused():
    with pytest.raises(ValueError, match='quantize="int4" runs on the CPU and on CUDA GPUs .* for mps'):
        int4.check_kernel(torch.device("mps"), torch.bfloat16)
    with pytest.raises(ValueError, match=r'quantize="int4" on CUDA computes in bfloat16 .*, not torch.float16'):
        int4.check_kernel(torch.device("cuda"), torch.float16)  # refused before any GPU is asked


def test_a_layer_whose_in_features_the_group_size_does_not_divide_is_refused():
    with pytest.raises(ValueError, match=f'quantize="int4" needs in-features that are a multiple of its group '
                                         f"size {GROUP} .*, got a weight of 48"):
        Int4Linear(torch.randn(16, 48))


def test_models_whose_in_features_the_group_size_does_not_divide_are_refused_before_loading(tmp_path):
    params = {**PRESETS["tiny"], "dim": 80, "n_heads": 5, "n_kv_heads": 1}
    ckpt_dir = write_random_checkpoint(tmp_path, params)
    with pytest.raises(ValueError, match=f'quantize="int4" needs in-features that are multiples of its group size '
                                         f'{GROUP}, but layers.N.attention.wq.weight has 80; use quantize="int8"'):
        _build(ckpt_dir, quantize="int4")


def test_a_shard_whose_in_features_the_group_size_does_not_divide_is_refused():
    args = ModelArgs.from_params(PRESETS["tiny"])  # hidden dim 224: 112 in each of two processes
    check_quantize_shapes("int4", args, 1)
    with pytest.raises(ValueError, match=r"layers.N.feed_forward.w2.weight has 112 \(224 split over 2 processes\)"):
        check_quantize_shapes("int4", args, 2)
    check_quantize_shapes("int4", dataclasses.replace(args, multiple_of=64), 2)  # hidden dim 256: 128 each
    check_quantize_shapes("int8", args, 2)  # int8 has no groups


def test_compiled_decoding_of_an_int4_model_gives_the_eager_tokens(tiny_checkpoint):
    prompts = ["Hello there", "The int4 kernel under torch.compile"]
    eager, compiled = (_build(tiny_checkpoint(1), torch.bfloat16, quantize="int4", compile=flag)
                       for flag in (False, True))
    assert (compiled.text_completion(prompts, temperature=0, max_gen_len=8)
            == eager.text_completion(prompts, temperature=0, max_gen_len=8))
