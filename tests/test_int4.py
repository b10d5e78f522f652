"""int4 weights (`quantize="int4"`): how values are quantized to Q4 blocks, what the kernels compute with them
(`llama.blocks_cpu`'s on VNNI CPUs, torch's int4 kernels elsewhere), how close the model stays to the original, and
what is refused.

The references are written here from the definition (w ≈ scale * q + min per block of 32 input values, float16
scale and min), in float64, apart from the kernels and the layer under test.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from llama import Llama, blocks_cpu, int4
from llama.args import PRESETS, ModelArgs
from llama.block_quant import Q4Blocks, Q8Blocks, dequantize, unpack_q4
from llama.checkpoint.random_weights import write_random_checkpoint
from llama.int4 import Int4Linear, Q8BlockLinear, quantize_q4
from llama.kernels import weight_bytes
from llama.validation import check_quantize_shapes

from conftest import q8_activations

GROUP = int4.GROUP_SIZE
KERNELS = ["blocks_cpu", "torch"]


def _build(ckpt_dir, dtype=torch.float32, **kwargs) -> Llama:
    return Llama.build(ckpt_dir, max_seq_len=64, max_batch_size=2, device="cpu", dtype=dtype, **kwargs)


@pytest.fixture
def kernel(request, monkeypatch) -> str:
    """int4 layers built from here on use this kernel: this package's (skipped without VNNI) or torch's."""
    if request.param == "torch":
        monkeypatch.setattr(blocks_cpu, "available", lambda: False)
    elif not blocks_cpu.available():
        pytest.skip("the blocks kernel needs x86 AVX-512 VNNI")
    return request.param


def random_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    weight = torch.randn(rows, cols) * 0.02
    weight[1, :GROUP] += 0.5  # a block far off zero: its minimum carries it
    weight[2, 5] = -0.3  # an outlier: only its own block's steps grow
    weight[3, :GROUP] = 0.01  # a constant block: no range at all
    return weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantized_values_are_within_half_a_step_of_the_weights(dtype):
    weight = random_weight(64, 5 * GROUP).to(dtype)
    blocks = quantize_q4(weight)
    q = unpack_q4(blocks.values)
    assert q.shape == weight.shape and q.max() <= 15
    assert blocks.scales.shape == blocks.mins.shape == (64, 5)
    assert blocks.scales.dtype == blocks.mins.dtype == torch.float16
    groups = weight.double().unflatten(1, (5, GROUP))
    low, high = groups.amin(-1), groups.amax(-1)
    scale, low_stored = blocks.scales.double(), blocks.mins.double()
    # The minimum is rounded down to float16 (at most one float16 step), and the scale, which spans the range
    # from it in 15 steps, up: nothing of the block falls outside q = 0..15.
    assert (low_stored <= low).all() and (low - low_stored <= low.abs() * 2**-10 + 2**-24).all()
    span = high - low_stored
    assert (scale >= span / 15).all() and (scale <= span / 15 * (1 + 2**-10) + 2**-24).all()
    error = (weight.double() - dequantize(blocks, torch.float64)).unflatten(1, (5, GROUP)).abs().amax(-1)
    assert (error <= scale / 2).all()
    # Asymmetric: each varied block uses the whole 0..15 range, its minimum at 0 and its maximum at 15.
    varied = high - low > 0
    q_groups = q.unflatten(1, (5, GROUP))
    assert (q_groups.amin(-1)[varied] == 0).all() and (q_groups.amax(-1)[varied] == 15).all()


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features, in_features", [(64, 3 * GROUP), (200, 5 * GROUP), (40, 18 * GROUP)])
def test_kernel_multiplies_by_the_dequantized_weight(kernel, dtype, rows, out_features, in_features):
    weight = random_weight(out_features, in_features, seed=rows).to(dtype)
    layer = Int4Linear(weight)
    x = torch.randn(2, rows, in_features).to(dtype)
    got = layer(x)
    w = dequantize(quantize_q4(weight), torch.float64)
    assert got.shape == (2, rows, out_features) and got.dtype == dtype
    if kernel == "blocks_cpu":  # activations quantized per block of 32, float32 sums, one rounding to dtype
        expected = q8_activations(x) @ w.T
        rounding = {torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
        assert ((got.double() - expected).abs() <= rounding * expected.abs() + 1e-5 * expected.abs().max()).all()
        return
    # torch's kernel: float32 sums in float32. In bfloat16 it rounds each dequantized weight (and the zero point,
    # up to the block's largest value) and the result to 8 bits, each within 2**-9 of the sum of |x| * |w|.
    expected = x.double() @ w.T
    block_max = w.abs().unflatten(1, (-1, GROUP)).amax(-1).repeat_interleave(GROUP, dim=1)
    bound = x.double().abs() @ block_max.T
    rounding = {torch.float32: 1e-5, torch.bfloat16: 2**-8}[dtype]
    assert ((got.double() - expected).abs() <= rounding * bound).all()


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_weights_quantized_in_chunks_of_rows_give_the_same_layer(kernel, monkeypatch):
    weight = random_weight(200, 3 * GROUP)  # 200 rows: three whole blocks of 64, then 8 padded to 64
    whole = Int4Linear(weight)
    monkeypatch.setattr(int4, "QUANTIZE_CHUNK_BYTES", 4 * 3 * GROUP * 64)  # 64 rows at a time
    chunked = Int4Linear(weight)
    assert torch.equal(chunked.packed, whole.packed)
    if kernel == "torch":
        assert torch.equal(chunked.scales_and_zeros, whole.scales_and_zeros)
        assert whole.packed.shape == (256, 3 * GROUP // 2)  # half a byte a weight, rows padded to a multiple of 64
    else:
        assert whole.scales_and_zeros is None and whole.packed.shape == (4, 3, 1280)  # groups, blocks, bytes


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_from_blocks_is_the_layer_of_their_weight(kernel, dtype):
    weight = random_weight(130, 4 * GROUP).to(dtype)
    blocks = quantize_q4(weight)
    layer, from_blocks = Int4Linear(weight), Int4Linear.from_blocks(blocks, dtype)
    assert from_blocks.weight.shape == weight.shape and from_blocks.weight.dtype == dtype
    assert torch.equal(from_blocks.packed, layer.packed)
    x = torch.randn(3, 4 * GROUP).to(dtype)
    assert torch.equal(from_blocks(x), layer(x))


def test_gguf_q4_0_blocks_are_packed_without_their_minimums_and_compute_the_same():
    """A Q4_0 block (w = scale * (q - 8)) is a Q4 block with min = -8 * scale; the kernel needs no minimums for it."""
    if not blocks_cpu.available():
        pytest.skip("the blocks kernel needs x86 AVX-512 VNNI")
    blocks = quantize_q4(random_weight(130, 4 * GROUP))
    q4_0 = Q4Blocks(blocks.values, blocks.scales, (blocks.scales.float() * -8).half())
    layer = Int4Linear.from_blocks(q4_0, torch.float32)
    assert blocks_cpu.format_of(layer.packed) == "q4_0" and layer.packed.shape == (3, 4, 1152)
    with_mins = Int4Linear.from_blocks(q4_0, torch.float32)
    with_mins.packed = blocks_cpu.pack(q4_0)  # the same blocks, minimums and all
    x = torch.randn(3, 4 * GROUP)
    torch.testing.assert_close(layer(x), with_mins(x), rtol=1e-5, atol=1e-6)
    ids = torch.tensor([0, 64, 129])
    assert torch.equal(layer.rows(ids, torch.float32), dequantize(q4_0)[ids])


def strided(tensor: torch.Tensor) -> torch.Tensor:
    """The same values as a view with gaps between rows, as a file's interleaved fields give."""
    wide = tensor.new_zeros(tensor.shape[0], tensor.shape[1] + 3)
    wide[:, 1:-2] = tensor
    return wide[:, 1:-2]


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_layers_from_strided_views_of_blocks_are_those_of_the_blocks(kernel):
    weight = random_weight(130, 4 * GROUP)
    blocks = quantize_q4(weight)
    views = Q4Blocks(strided(blocks.values), strided(blocks.scales), strided(blocks.mins))
    assert not views.values.is_contiguous()
    x = torch.randn(3, 4 * GROUP)
    assert torch.equal(Int4Linear.from_blocks(views, torch.float32)(x),
                       Int4Linear.from_blocks(blocks, torch.float32)(x))
    q8 = Q8Blocks(torch.randint(-128, 128, (130, 4 * GROUP), dtype=torch.int8), blocks.scales)
    q8_views = Q8Blocks(strided(q8.values), strided(q8.scales))
    assert torch.equal(Q8BlockLinear.from_blocks(q8_views, torch.float32)(x),
                       Q8BlockLinear.from_blocks(q8, torch.float32)(x))


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_rows_read_back_the_weight_the_layer_computes_with(kernel):
    weight = random_weight(130, 4 * GROUP)
    layer = Int4Linear(weight)
    ids = torch.tensor([[0, 129, 64], [3, 3, 100]])
    expected = dequantize(quantize_q4(weight))[ids]  # float16 scale and min, computed in float32
    assert torch.equal(layer.rows(ids, torch.float32), expected)
    bf16 = Int4Linear.from_blocks(quantize_q4(weight), torch.bfloat16)
    got = bf16.rows(ids, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    if kernel == "blocks_cpu":
        assert torch.equal(got, expected.bfloat16())
    else:  # torch's kernel keeps scale and zero point in the model's dtype: within a bfloat16 step of the block
        assert ((got.double() - expected.double()).abs() <= 2**-7 * weight[ids].abs().amax()).all()


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int4_layers_keep_only_the_packed_weights(tiny_checkpoint, kernel):
    quantized = _build(tiny_checkpoint(1), torch.bfloat16, quantize="int4")
    linears = [m for m in quantized.model.modules() if isinstance(m, Int4Linear)]
    assert len(linears) == 2 * 4 + 1  # wqkv, wo, w13 and w2 in each layer, and the output layer
    expected = 0
    for layer in linears:
        rows, cols = layer.weight.shape
        assert layer.weight.is_meta and layer.packed.dtype == torch.uint8
        if kernel == "torch":
            assert layer.scales_and_zeros.shape == (cols // GROUP, -(-rows // 64) * 64, 2)
            expected += layer.packed.nbytes + layer.scales_and_zeros.nbytes
        else:  # values, float16 scales and mins: 0.625 bytes a weight, rows padded to 64
            assert layer.scales_and_zeros is None and layer.packed.numel() == -(-rows // 64) * 64 * cols * 0.625
            expected += layer.packed.nbytes
    rest = sum(t.nbytes for m in quantized.model.modules() if not isinstance(m, Int4Linear)
               for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)])
    assert weight_bytes(quantized.model) == expected + rest
    # No copy of a linear weight in any other dtype is left anywhere (the embedding has the output layer's shape).
    shapes = {tuple(layer.weight.shape) for layer in linears}
    tensors = [*quantized.model.named_parameters(), *quantized.model.named_buffers()]
    assert not [name for name, t in tensors if not t.is_meta and tuple(t.shape) in shapes
                and name != "tok_embeddings.weight"]
    assert set(quantized.model.state_dict()) == set(_build(tiny_checkpoint(1)).model.state_dict())


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q8_block_layers_compute_with_and_read_back_their_blocks(kernel, dtype):
    torch.manual_seed(0)
    blocks = Q8Blocks(torch.randint(-128, 128, (130, 96), dtype=torch.int8), (torch.rand(130, 3) * 1e-3).half())
    layer = Q8BlockLinear.from_blocks(blocks, dtype)
    w = dequantize(blocks, torch.float64)
    x = torch.randn(5, 96).to(dtype)
    got = layer(x)
    assert got.shape == (5, 130) and got.dtype == dtype
    if kernel == "blocks_cpu":  # only the packed blocks are kept; activations quantized per block of 32
        assert layer.weight.is_meta and layer.packed.numel() == 192 * 96 * 1.0625
        expected = q8_activations(x) @ w.T
    else:  # the weight dequantized to the model's dtype, a plain matmul
        assert layer.packed is None and layer.weight.dtype == dtype
        expected = x.double() @ w.to(dtype).double().T
    rounding = {torch.float32: 1e-5, torch.bfloat16: 2**-7}[dtype]
    assert ((got.double() - expected).abs() <= rounding * expected.abs() + rounding * expected.abs().max()).all()
    ids = torch.tensor([129, 0, 64])
    assert torch.equal(layer.rows(ids, dtype), w[ids].to(dtype))


def _reference_with_dequantized_weights(ckpt_dir, kernel: str) -> Llama:
    """A float32 model whose linear layers hold their weights quantized to int4 and dequantized, and see the
    activations as `kernel` does."""
    reference = _build(ckpt_dir)
    for module in reference.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.weight.data = dequantize(quantize_q4(module.weight))
            if kernel == "blocks_cpu":
                module.register_forward_pre_hook(lambda _, args: (q8_activations(args[0]).float(),))
    return reference


@pytest.mark.parametrize("kernel", KERNELS, indirect=True)
def test_int4_model_computes_with_its_dequantized_weights(tiny_checkpoint, tokens, kernel):
    quantized = _build(tiny_checkpoint(1), quantize="int4")
    reference = _reference_with_dequantized_weights(tiny_checkpoint(1), kernel)
    expected = reference.model(tokens, 0)
    got = quantized.model(tokens, 0)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    prompts = ["Hello", "Int4 decoding goes through its kernel"]
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


def test_blocks_whose_tensors_do_not_fit_together_are_refused():
    blocks = quantize_q4(random_weight(64, 2 * GROUP))
    with pytest.raises(ValueError, match=r"Q4 blocks' scales must be torch.float16 of shape \(64, 2\) .*, got "
                                         r"torch.float32 of shape \(64, 2\)"):
        Int4Linear.from_blocks(dataclasses.replace(blocks, scales=blocks.scales.float()))
    with pytest.raises(ValueError, match=r"Q4 blocks' mins must be torch.float16 of shape \(64, 2\) .*, got "
                                         r"torch.float16 of shape \(64, 1\)"):
        Int4Linear.from_blocks(dataclasses.replace(blocks, mins=blocks.mins[:, :1]))
    q8 = Q8Blocks(torch.zeros(64, 2 * GROUP, dtype=torch.uint8), torch.ones(64, 2, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"Q8 blocks' values must be torch.int8 of shape \(64, 64\)"):
        Q8BlockLinear.from_blocks(q8)


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
