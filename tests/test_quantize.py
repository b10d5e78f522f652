"""int8 quantization: what each layer computes with, and how close the model stays to the original.

Two kernels serve `quantize="int8"` on the CPU. On x86 processors with AVX-512 VNNI, `llama.int8_cpu` multiplies the
int8 weights by activations quantized per block of 32 values (llama.cpp's Q8_0 scheme). Elsewhere (other CPUs, and
GPUs) activations keep the model's dtype and the layers compute with exactly the dequantized weights. The
references here are written from those definitions, in float64, apart from the code under test.
"""

import pytest
import torch
import torch.nn.functional as F

from llama import Llama, cpu_extension, int8_cpu
from llama.kernels import Int8Linear

from conftest import q8_activations

needs_vnni = pytest.mark.skipif(not int8_cpu.available(), reason="the int8 CPU kernel needs x86 AVX-512 VNNI")


def _build(tiny_checkpoint, dtype=torch.float32, **kwargs) -> Llama:
    return Llama.build(tiny_checkpoint(1), max_seq_len=64, max_batch_size=2, device="cpu", dtype=dtype, **kwargs)


@pytest.fixture
def weight_only(monkeypatch):
    """int8 layers built from here on use torch's kernels, as on a CPU without VNNI."""
    monkeypatch.setattr(int8_cpu, "available", lambda: False)


def unpack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The int8 values (rows, cols) of a packed weight: (groups, K / 4, 64, 4) bytes holding value + 128."""
    groups, quads = packed.shape[:2]
    values = (packed ^ 0x80).view(torch.int8).permute(0, 2, 1, 3).reshape(groups * 64, quads * 4)
    return values[:rows, :cols]


def dequantized(layer: Int8Linear) -> torch.Tensor:
    rows, cols = layer.weight.shape
    values = layer.weight if layer.packed is None else unpack(layer.packed, rows, cols)
    return values.double() * layer.scale.double()[:, None]


def _reference_with_weights_of(quantized: Llama, tiny_checkpoint) -> Llama:
    """A float32 model whose linear layers hold the int8 layers' dequantized weights."""
    reference = _build(tiny_checkpoint)
    modules = dict(reference.model.named_modules())
    for name, module in quantized.model.named_modules():
        if isinstance(module, Int8Linear):
            modules[name].weight.data = dequantized(module).float()
    return reference


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, out_features, in_features", [(1, 64, 32), (1, 1000, 600), (3, 130, 2048),
                                                              (17, 200, 96)])
def test_kernel_multiplies_int8_weights_by_q8_activations(dtype, rows, out_features, in_features):
    torch.manual_seed(rows)
    layer = Int8Linear(torch.randn(out_features, in_features) * 0.02)
    x = torch.randn(2, rows, in_features).to(dtype)
    x[0, 0, :5] = 40.0  # an outlier: only its own block of 32 loses precision
    got = layer(x)
    expected = q8_activations(x) @ dequantized(layer).T
    assert got.shape == (2, rows, out_features) and got.dtype == dtype
    rounding = {torch.float32: 1e-6, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    error = (got.double() - expected).abs()
    assert (error <= rounding * expected.abs() + 1e-5 * expected.abs().max()).all()


@needs_vnni
def test_kernel_refuses_activations_of_the_wrong_width():
    layer = Int8Linear(torch.randn(64, 96))
    with pytest.raises(ValueError, match="x has 100 features but this int8 layer takes 96"):
        layer(torch.randn(1, 100))


@needs_vnni
def test_on_a_vnni_cpu_int8_layers_keep_only_the_packed_weights(tiny_checkpoint):
    quantized = _build(tiny_checkpoint, torch.bfloat16, quantize="int8")
    linears = [m for m in quantized.model.modules() if isinstance(m, Int8Linear)]
    assert len(linears) == 2 * 4 + 1  # wqkv, wo, w13 and w2 in each layer, and the output layer
    for layer in linears:
        rows, cols = layer.weight.shape
        assert layer.weight.is_meta and layer.packed.dtype == torch.uint8
        assert layer.packed.numel() == -(-rows // 64) * 64 * -(-cols // 32) * 32  # one byte a weight, padded
    assert set(quantized.model.state_dict()) == set(_build(tiny_checkpoint).model.state_dict())


@needs_vnni
def test_int8_model_on_a_vnni_cpu_computes_with_q8_activations(tiny_checkpoint, tokens):
    quantized = _build(tiny_checkpoint, quantize="int8")
    reference = _reference_with_weights_of(quantized, tiny_checkpoint)
    for module in reference.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_pre_hook(lambda _, args: (q8_activations(args[0]).float(),))
    expected = reference.model(tokens, 0)
    got = quantized.model(tokens, 0)
    assert (got - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_int8_computes_with_the_dequantized_weights(tiny_checkpoint, tokens, dtype, weight_only):
    quantized = _build(tiny_checkpoint, dtype, quantize="int8")
    linears = {name: m for name, m in quantized.model.named_modules() if isinstance(m, Int8Linear)}
    assert len(linears) == 2 * 4 + 1
    assert all(m.weight.dtype == torch.int8 and m.scale.shape == (m.weight.shape[0],) for m in linears.values())
    assert quantized.model.tok_embeddings.weight.dtype == dtype
    assert set(quantized.model.state_dict()) == set(_build(tiny_checkpoint).model.state_dict())
    expected = _reference_with_weights_of(quantized, tiny_checkpoint).model(tokens, 0)
    got = quantized.model(tokens, 0)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2  # bfloat16 activations round at every step
    assert (got - expected).abs().max().item() <= tolerance * expected.abs().max().item()


def test_weight_only_int8_generates_the_tokens_of_its_dequantized_weights(tiny_checkpoint, weight_only):
    quantized = _build(tiny_checkpoint, quantize="int8")
    reference = _reference_with_weights_of(quantized, tiny_checkpoint)
    prompts = ["Hello", "Int8 decoding goes through its own kernel"]
    expected = reference.text_completion(prompts, temperature=0, max_gen_len=8)
    assert quantized.text_completion(prompts, temperature=0, max_gen_len=8) == expected


@pytest.mark.parametrize("kernel", ["the CPU's int8 kernel", "weight-only"])
def test_int8_stays_close_to_the_unquantized_model(tiny_checkpoint, tokens, kernel, monkeypatch):
    if kernel == "weight-only":
        monkeypatch.setattr(int8_cpu, "available", lambda: False)
    elif not int8_cpu.available():
        pytest.skip("the int8 CPU kernel needs x86 AVX-512 VNNI")
    original = _build(tiny_checkpoint).model(tokens, 0)
    quantized = _build(tiny_checkpoint, quantize="int8").model(tokens, 0)
    relative = (quantized - original).abs().max() / original.abs().max()
    assert 0 < relative.item() < 0.05
    kl = F.kl_div(quantized.log_softmax(-1), original.log_softmax(-1), log_target=True, reduction="batchmean")
    assert kl.item() < 0.01


@pytest.mark.skipif(not cpu_extension.processor_has_vnni(), reason="the kernel is only built on VNNI processors")
def test_without_a_compiler_int8_warns_and_uses_torch_kernels(monkeypatch):
    def no_compiler(*args, **kwargs):  # what torch's builder raises, in short
        raise RuntimeError("Error building extension 'llama_int8_cpu': [1/2] c++ -MMD -MF int8_cpu.o.d -O3\n"
                           "FAILED: int8_cpu.o\n/bin/sh: 1: c++: not found\nninja: build stopped: subcommand failed.")

    monkeypatch.setattr("torch.utils.cpp_extension.load", no_compiler)
    int8_cpu._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match=r"could not build the CPU kernel int8_cpu.cpp \(/bin/sh: 1: c\+\+: "
                                             r"not found\); using torch's int8 weight-only kernel"):
            assert not int8_cpu.available()
        layer = Int8Linear(torch.randn(8, 32))
    finally:
        int8_cpu._library.cache_clear()  # the next use loads the real build again
    assert layer.packed is None and layer.weight.dtype == torch.int8
    x = torch.randn(1, 32)
    assert torch.allclose(layer(x), x @ dequantized(layer).float().T, rtol=1e-5, atol=1e-6)


def test_unknown_quantization_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match='quantize must be None or "int8" or "int4", got \'int3\''):
        _build(tiny_checkpoint, quantize="int3")

