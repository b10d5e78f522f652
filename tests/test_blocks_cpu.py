"""The CPU kernel for weights in GGUF's blocks of 32 (`llama.blocks_cpu`): what it computes with Q4 blocks
(w = scale * q + min), Q4 blocks whose minimum is -8 * scale packed without it ("q4_0", GGUF's Q4_0) and Q8 blocks
(w = scale * q), and how it reads rows back.

The references are `llama.block_quant.dequantize` (the blocks' definition) times the activations as the kernel
quantizes them (`q8_activations`, per block of 32 values), in float64.
"""

import pytest
import torch

from llama import blocks_cpu
from llama.block_quant import Q4Blocks, Q8Blocks, dequantize, has_q4_0_mins, pack_q4

from conftest import q8_activations

pytestmark = pytest.mark.skipif(not blocks_cpu.available(), reason="the blocks kernel needs x86 AVX-512 VNNI")


def q4_blocks(rows: int, cols: int, seed: int = 0) -> Q4Blocks:
    """Random Q4 blocks: every q in 0..15, scales and (mostly negative) mins of a trained layer's size."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (rows, cols), generator=generator)
    scales = (torch.rand(rows, cols // 32, generator=generator) * 0.01).half()
    mins = ((torch.rand(rows, cols // 32, generator=generator) - 0.8) * 0.1).half()
    return Q4Blocks(pack_q4(q), scales, mins)


def q8_blocks(rows: int, cols: int, seed: int = 0) -> Q8Blocks:
    """Random Q8 blocks, -128 included (the kernel stores q + 128)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.randint(-128, 128, (rows, cols), generator=generator, dtype=torch.int8)
    return Q8Blocks(values, (torch.rand(rows, cols // 32, generator=generator) * 0.001).half())


def q4_0_blocks(rows: int, cols: int, seed: int = 0) -> Q4Blocks:
    """Random Q4 blocks of GGUF's Q4_0: w = scale * (q - 8)."""
    blocks = q4_blocks(rows, cols, seed)
    return Q4Blocks(blocks.values, blocks.scales, (blocks.scales.float() * -8).half())


MAKERS = {"q4": q4_blocks, "q4_0": q4_0_blocks, "q8": q8_blocks}


def packed(fmt: str, blocks) -> torch.Tensor:
    return blocks_cpu.pack(blocks, without_mins=fmt == "q4_0")


@pytest.mark.parametrize("fmt", FORMATS := ["q4", "q4_0", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, out_features, in_features", [
    (1, 64, 32), (2, 100, 96), (3, 17, 64), (7, 130, 256), (9, 1000, 64), (65, 70, 128), (1, 200, 2048)])
def test_kernel_multiplies_q8_activations_by_the_dequantized_blocks(fmt, dtype, rows, out_features, in_features):
    blocks = MAKERS[fmt](out_features, in_features, seed=rows)
    x = torch.randn(2, rows, in_features).to(dtype)
    x[0, 0, :5] = 40.0  # an outlier: only its own block of 32 loses precision
    got = blocks_cpu.linear(x, packed(fmt, blocks), out_features)
    expected = q8_activations(x) @ dequantize(blocks).double().T
    assert got.shape == (2, rows, out_features) and got.dtype == dtype
    # float32 sums of the blocks' products; the result rounded once to bfloat16 or float16.
    rounding = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-10}[dtype]
    error = (got.double() - expected).abs()
    assert (error <= rounding * expected.abs() + 1e-5 * expected.abs().max()).all()


@pytest.mark.parametrize("fmt, bytes_per_weight", [("q4", 0.625), ("q4_0", 0.5625), ("q8", 1.0625)])
def test_packed_blocks_take_the_bytes_of_their_values_and_scales(fmt, bytes_per_weight):
    weight = packed(fmt, MAKERS[fmt](130, 96))  # 130 rows: two groups of 64, then 2 padded to 64
    assert weight.dtype == torch.uint8 and weight.shape[:2] == (3, 3)
    assert weight.numel() == 3 * 64 * 96 * bytes_per_weight
    assert blocks_cpu.format_of(weight) == fmt


def test_only_blocks_whose_minimums_are_minus_8_scales_are_packed_without_them():
    assert has_q4_0_mins(q4_0_blocks(64, 64)) and not has_q4_0_mins(q4_blocks(64, 64))
    with pytest.raises(ValueError, match="whose every minimum is -8 × scale"):
        blocks_cpu.pack(q4_blocks(64, 64), without_mins=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rows_are_the_dequantized_weights_rows(fmt):
    blocks = MAKERS[fmt](200, 96)
    ids = torch.tensor([[0, 199, 63], [64, 17, 17]])
    weight = dequantize(blocks)
    assert torch.equal(blocks_cpu.rows(packed(fmt, blocks), ids, torch.float32), weight[ids])
    assert torch.equal(blocks_cpu.rows(packed(fmt, blocks), ids, torch.bfloat16), weight[ids].bfloat16())


def test_zero_activations_give_zero_whatever_the_mins():
    blocks = q4_blocks(64, 64)
    out = blocks_cpu.linear(torch.zeros(3, 64), blocks_cpu.pack(blocks), 64)
    assert torch.equal(out, torch.zeros(3, 64))


def test_activations_of_the_wrong_width_and_too_many_out_features_are_refused():
    packed = blocks_cpu.pack(q4_blocks(64, 96))
    with pytest.raises(ValueError, match="x has 100 features but this layer takes 96"):
        blocks_cpu.linear(torch.randn(1, 100), packed, 64)
    with pytest.raises(ValueError, match="out_features 65 is more than the 64 rows packed"):
        blocks_cpu.linear(torch.randn(1, 96), packed, 65)
