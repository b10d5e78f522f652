"""bfloat16 on the CPU by default: `llama.bf16_cpu`'s kernels.

On x86 processors with AVX-512 BF16 every bfloat16 linear layer is a `Bf16Linear`: the weight is packed in groups of
32 output rows at load and only that copy is kept, and the kernel computes any number of rows of activations (decode
steps and prompts); each transformer block computes a decode step in one call. The kernels sum exact products of
bfloat16 values in float32 and round once, so they are checked against float64 computations on the same values; the
model is checked against the plain path (`nn.Linear` layers, no oneDNN packing, torch's attention), and a block's
one call against its own modules, bit for bit.
"""

import pytest
import torch

import llama.kernels
from llama import Llama, bf16_cpu, blocks_cpu, int8_cpu
from llama.cpu_decode import Bf16FeedForward, Bf16RMSNorm, Bf16TransformerBlock, bf16_decode_step
from llama.kernels import Bf16Linear
from llama.model import Attention, KVCache, RMSNorm, apply_rope

needs_bf16 = pytest.mark.skipif(not bf16_cpu.available(), reason="the bfloat16 CPU kernel needs x86 AVX-512 BF16")


def _check_against_float64(rows: int, out_features: int, in_features: int) -> None:
    generator = torch.Generator().manual_seed(rows * 10_000 + out_features * 100 + in_features)
    x = torch.randn(rows, in_features, generator=generator).bfloat16()
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    expected = x.double() @ weight.double().T
    got = bf16_cpu.linear(x, bf16_cpu.pack(weight), out_features).double()
    # Rounding the result to bfloat16 (half a step: 2^-9 relative) plus float32 sums of K products.
    bound = 2.0**-8 * expected.abs() + 1e-5 * (x.double().abs() @ weight.double().abs().T)
    assert got.shape == (rows, out_features)
    assert ((got - expected).abs() <= bound).all(), f"M={rows} N={out_features} K={in_features}"


@needs_bf16
@pytest.mark.parametrize("rows", [*range(1, 11), 16, 17, 33])
def test_kernel_matches_float64_products_for_any_number_of_rows(rows):
    """Rows go 8 at a time (and the rest together); output rows 32 to a group, the last one partly padding."""
    for out_features, in_features in [(64, 128), (65, 96), (130, 2080), (7, 160)]:
        _check_against_float64(rows, out_features, in_features)


@needs_bf16
@pytest.mark.parametrize("in_features", [1, 2, 3, 31, 33, 63, 95, 97, 1001])
def test_kernel_takes_odd_in_features(in_features):
    """The instruction multiplies pairs of inputs: an odd row's last value has no partner but zero padding."""
    for rows, out_features in [(1, 9), (2, 17), (5, 70)]:
        _check_against_float64(rows, out_features, in_features)


@needs_bf16
def test_the_last_value_of_an_odd_row_is_not_paired_with_what_lies_beyond_it():
    x = torch.full((2, 4), float("nan")).bfloat16()
    x[:, :3] = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    weight = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.0, 2.0]]).bfloat16()
    got = bf16_cpu.linear(x[:, :3].contiguous()[:1], bf16_cpu.pack(weight), 2)  # row 0; row 1 starts with a 4
    assert got.tolist() == [[6.0, 6.5]]
    rows = x.view(-1)[:7].view(1, 7)[:, :3]  # a view ending just before a NaN in memory
    assert bf16_cpu.linear(rows, bf16_cpu.pack(weight), 2).tolist() == [[6.0, 6.5]]


@needs_bf16
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_widened_results_are_the_bfloat16_results_in_float32(rows):
    """For logits, which the model returns in float32: the same numbers as converting the bfloat16 results."""
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 97, generator=generator).bfloat16()
    weight = torch.randn(70, 97, generator=generator).bfloat16()  # a last group of 6 rows (26 of padding)
    packed = bf16_cpu.pack(weight)
    widened = bf16_cpu.linear(x, packed, 70, widen=True)
    assert widened.dtype == torch.float32 and widened.shape == (2, rows, 70)
    assert torch.equal(widened, bf16_cpu.linear(x, packed, 70).float())
    assert torch.equal(widened.bfloat16().float(), widened)  # nothing finer than bfloat16 kept


@needs_bf16
def test_pack_lays_out_groups_of_32_rows_by_pairs_of_inputs():
    weight = torch.arange(40 * 5).view(40, 5).bfloat16()
    packed = bf16_cpu.pack(weight)
    assert packed.shape == (2, 3, 32, 2)
    assert packed[1, 2, 3, 0] == weight[35, 4] and packed[1, 2, 3, 1] == 0  # past the last input: zero
    assert packed[0, 1, 7].tolist() == weight[7, 2:4].tolist()
    assert (packed[1, :, 8:] == 0).all()  # rows 40..63 are padding


@needs_bf16
def test_kernel_keeps_leading_dimensions_and_refuses_what_it_cannot_read():
    x = torch.randn(2, 3, 40).bfloat16()
    weight = torch.randn(12, 40).bfloat16()
    packed = bf16_cpu.pack(weight)
    out = bf16_cpu.linear(x, packed, 12)
    assert out.shape == (2, 3, 12) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), (x.float() @ weight.float().T), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="x has 42 features and asks for 12, but the packed weight of shape "
                                         r"\(1, 20, 32, 2\) takes 40 and gives 32"):
        bf16_cpu.linear(torch.randn(1, 42).bfloat16(), packed, 12)
    with pytest.raises(ValueError, match="asks for 33"):
        bf16_cpu.linear(x, packed, 33)
    with pytest.raises(ValueError, match="bfloat16 x and a weight packed by bf16_cpu.pack, got torch.float32"):
        bf16_cpu.linear(x.float(), packed, 12)
    with pytest.raises(ValueError, match=r"of shape \(12, 40\)"):
        bf16_cpu.linear(x, weight, 12)


def _attention_in_float64(q, keys, values, visible):
    rows, _, n_heads, head_dim = q.shape
    n_kv_heads = keys.shape[2]
    grouped = q.double().view(rows, n_kv_heads, n_heads // n_kv_heads, head_dim)
    scores = grouped @ keys.double().permute(0, 2, 3, 1) / head_dim**0.5  # (rows, n_kv, group, kv_len)
    if visible is not None:
        scores = scores.masked_fill(~visible.view(rows, 1, 1, -1), float("-inf"))
    return (scores.softmax(-1) @ values.double().transpose(1, 2)).reshape(rows, 1, n_heads, head_dim)


@needs_bf16
@pytest.mark.parametrize("rows,n_heads,n_kv_heads,head_dim", [(1, 32, 8, 64), (2, 6, 3, 16), (3, 12, 1, 32),
                                                             (2, 8, 8, 128)])
@pytest.mark.parametrize("kv_len", [1, 15, 16, 17, 130])
def test_decode_attention_matches_float64_on_cache_views(rows, n_heads, n_kv_heads, head_dim, kv_len):
    """One call per step: keys and values are the rows' slots of a longer cache (slots 1.., positions [0, kv_len)),
    q a view beside the keys' heads; 12 query heads per kv head exceed the 8 the kernel keeps in registers."""
    generator = torch.Generator().manual_seed(kv_len * 1000 + n_heads)
    cache = torch.randn(2, rows + 1, 160, n_kv_heads, head_dim, generator=generator).bfloat16()
    keys, values = cache[0, 1:, :kv_len], cache[1, 1:, :kv_len]
    q = torch.randn(rows, 1, n_heads + n_kv_heads, head_dim, generator=generator).bfloat16()[:, :, :n_heads]
    visible = torch.rand(rows, 1, 1, kv_len, generator=generator) < 0.6
    visible[..., -1] = True  # a new token sees itself
    for mask in (None, visible):
        expected = _attention_in_float64(q, keys, values, mask)
        got = bf16_cpu.decode_attention(q, keys, values, mask)
        assert got.shape == q.shape and got.dtype == torch.bfloat16
        assert ((got.double() - expected).abs() <= 2.0**-8 * expected.abs() + 1e-4).all()


@needs_bf16
def test_decode_attention_leaves_what_it_cannot_compute_to_the_caller():
    keys = torch.randn(1, 5, 2, 64).bfloat16()
    q = torch.randn(1, 1, 4, 64).bfloat16()
    assert bf16_cpu.decode_attention(q.float(), keys.float(), keys.float(), None) is None  # another dtype
    narrow = torch.randn(1, 5, 2, 8).bfloat16()
    assert bf16_cpu.decode_attention(q[..., :8], narrow, narrow, None) is None  # head_dim not a multiple of 16
    strided = torch.randn(1, 5, 64, 2).bfloat16().transpose(2, 3)
    assert bf16_cpu.decode_attention(q, strided, strided, None) is None  # heads not laid out as the cache's
    assert bf16_cpu.decode_attention(torch.randn(1, 2, 4, 64).bfloat16(), keys, keys, None) is None  # two queries


@needs_bf16
@pytest.mark.parametrize("rows,n_heads,n_kv_heads,head_dim", [(1, 32, 8, 64), (3, 6, 2, 16), (2, 4, 4, 128)])
def test_rope_and_store_gives_apply_rope_and_the_cache_update_bit_for_bit(rows, n_heads, n_kv_heads, head_dim):
    """Rows in slots 1.. of the cache, each at its own position; its rope rows are those of its positions."""
    generator = torch.Generator().manual_seed(rows * 100 + head_dim)
    qkv = torch.randn(rows, 1, (n_heads + 2 * n_kv_heads) * head_dim, generator=generator).bfloat16() * 30
    angles = torch.rand(rows, 1, 1, 1, head_dim // 2, generator=generator).repeat_interleave(2, -1) * 6.3
    sign = torch.tensor([-1.0, 1.0]).repeat(head_dim // 2)
    rope = torch.cat([angles.cos(), angles.sin() * sign], dim=2)  # (rows, 1, 2, 1, head_dim), as the model's
    positions = torch.tensor([[5], [0], [39]])[:rows]
    caches = [KVCache(rows + 2, 40, n_kv_heads, head_dim, qkv) for _ in range(2)]
    qk, v = qkv.split([(n_heads + n_kv_heads) * head_dim, n_kv_heads * head_dim], dim=-1)
    rotated = apply_rope(qk.view(rows, 1, n_heads + n_kv_heads, head_dim), rope)
    expected_q, k = rotated.split([n_heads, n_kv_heads], dim=2)
    caches[0].update(k, v.view(rows, 1, n_kv_heads, head_dim), 1, positions, None)
    q = bf16_cpu.rope_and_store(qkv, rope, positions, caches[1].k, caches[1].v, 1, n_heads)
    assert q.shape == (rows, 1, n_heads, head_dim) and torch.equal(q, expected_q)
    assert torch.equal(caches[1].k, caches[0].k) and torch.equal(caches[1].v, caches[0].v)
    assert caches[1].k[1:1 + rows].abs().sum() > 0


@needs_bf16
def test_rope_and_store_refuses_slots_and_positions_outside_the_cache():
    cache = KVCache(2, 8, 1, 16, torch.zeros(1, dtype=torch.bfloat16))
    qkv, rope = torch.ones(1, 1, 3 * 16, dtype=torch.bfloat16), torch.ones(1, 1, 2, 1, 16)
    with pytest.raises(ValueError, match=r"slots \[2, 3\) are outside the cache's 2"):
        bf16_cpu.rope_and_store(qkv, rope, torch.tensor([[0]]), cache.k, cache.v, 2, 1)
    with pytest.raises(ValueError, match=r"positions \[8\] must lie in \[0, max_seq_len=8\)"):
        bf16_cpu.rope_and_store(qkv, rope, torch.tensor([[8]]), cache.k, cache.v, 1, 1)
    assert cache.k.abs().sum() == 0 and cache.v.abs().sum() == 0  # nothing written


@needs_bf16
@pytest.mark.parametrize("dim", [1, 15, 16, 17, 2048, 2049])
def test_rms_norm_gives_the_models_bfloat16_numbers_bit_for_bit(dim):
    norm = RMSNorm(dim, eps=1e-5).bfloat16()
    generator = torch.Generator().manual_seed(dim)
    norm.weight.data = torch.randn(dim, generator=generator).bfloat16()
    x = (torch.randn(2, 3, dim, generator=generator) * 5).bfloat16()
    assert torch.equal(bf16_cpu.rms_norm(x, norm.weight, norm.eps), norm(x))
    assert bf16_cpu.rms_norm(x.float(), norm.weight, norm.eps) is None  # float32 is left to RMSNorm
    with pytest.raises(ValueError, match=rf"weight of shape \({dim + 1},\) for x of {dim} features"):
        bf16_cpu.rms_norm(x, torch.ones(dim + 1, dtype=torch.bfloat16), 1e-5)


@needs_bf16
@pytest.mark.parametrize("shape", [(1, 1, 16384), (3, 66), (2, 5, 34), (300, 2 * 257)])
def test_silu_mul_gives_torchs_bfloat16_numbers(shape):
    """Torch's two roundings; only the exponential inside silu is the kernel's own, so a value may sit one
    bfloat16 step from torch's where silu's float32 value lies at a rounding boundary: rarely, never further."""
    gate_up = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[-1])) * 4).bfloat16()
    gate, up = gate_up.chunk(2, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    got = bf16_cpu.silu_mul(gate_up)
    assert got.shape == expected.shape and got.dtype == torch.bfloat16
    assert ((got.float() - expected.float()).abs() <= 2.0**-7 * expected.float().abs()).all()
    assert (got != expected).sum() <= max(1, expected.numel() // 10_000)
    with pytest.raises(ValueError, match=r"an even width, got torch.bfloat16 on cpu of shape \(.*5\)"):
        bf16_cpu.silu_mul(gate_up[..., :5])


def _build(tiny_checkpoint) -> Llama:
    return Llama.build(tiny_checkpoint(1), max_seq_len=64, max_batch_size=2, device="cpu", dtype=torch.bfloat16)


@needs_bf16
def test_bfloat16_model_decodes_through_the_kernel_and_matches_plain_linear_layers(tiny_checkpoint, monkeypatch):
    fast = _build(tiny_checkpoint)
    layers = [m for m in fast.model.modules() if isinstance(m, Bf16Linear)]
    assert len(layers) == 2 * 4 + 1  # every linear layer, keeping only its packed weight
    assert all(layer.weight.dtype == torch.bfloat16 and layer.weight.is_meta for layer in layers)
    attentions = [m for m in fast.model.modules() if isinstance(m, Attention)]
    assert [m.decode_step for m in attentions] == [bf16_decode_step] * 2
    assert sum(isinstance(m, Bf16RMSNorm) for m in fast.model.modules()) == 2 * 2 + 1  # every norm
    assert [type(layer.feed_forward) for layer in fast.model.layers] == [Bf16FeedForward] * 2
    assert [type(layer) for layer in fast.model.layers] == [Bf16TransformerBlock] * 2
    assert [layer.widen_output for layer in layers] == [False] * 2 * 4 + [True]  # the output layer writes float32
    monkeypatch.setattr(bf16_cpu, "available", lambda: False)  # as where the processor lacks AVX-512 BF16 ...
    monkeypatch.setattr(llama.kernels, "pack_for_cpu", lambda weight: None)  # ... and oneDNN cannot pack
    plain = _build(tiny_checkpoint)
    assert not any(isinstance(m, Bf16Linear) for m in plain.model.modules())
    assert not any(isinstance(m, Attention) and m.decode_step for m in plain.model.modules())
    assert not any(isinstance(m, (Bf16RMSNorm, Bf16FeedForward, Bf16TransformerBlock)) for m in plain.model.modules())
    calls = []
    original = bf16_cpu.linear
    monkeypatch.setattr(bf16_cpu, "linear", lambda x, *rest: calls.append(x.shape) or original(x, *rest))
    stepped = []
    decode_layer = bf16_cpu.decode_layer
    monkeypatch.setattr(bf16_cpu, "decode_layer", lambda *args: stepped.append(args[2].tolist()) or decode_layer(*args))
    tokens = torch.tensor([fast.tokenizer.encode("The kernel decodes one token at a time, then a few more of them",
                                                 bos=True, eos=False)])
    prompt_len = 9
    logits = {}
    for name, built in (("fast", fast), ("plain", plain)):  # a prompt, then each further token as a decode step
        steps = [built.model(tokens[:, :prompt_len], 0)]
        steps += [built.model(tokens[:, pos : pos + 1], pos) for pos in range(prompt_len, tokens.shape[1])]
        logits[name] = torch.cat(steps, dim=1)
    decode_steps = tokens.shape[1] - prompt_len
    assert decode_steps >= 4
    # A prompt goes through each layer; a decode step's blocks are one call each, then the output layer.
    prompt = [(1, prompt_len, layer.weight.shape[1]) for layer in layers]
    assert calls == prompt + [(1, 1, layers[-1].weight.shape[1])] * decode_steps
    assert stepped == [[[pos]] for pos in range(prompt_len, tokens.shape[1]) for _ in range(2)]  # decode steps only
    expected = logits["plain"]
    assert (logits["fast"] - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()


@needs_bf16
@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_a_blocks_decode_step_in_one_call_gives_its_modules_numbers_bit_for_bit(tiny_checkpoint, monkeypatch,
                                                                               quantize):
    """Three rows at ragged positions of slots 1-3 (so attention is masked row by row): the logits and every key and
    value written are those of the blocks' own modules (their plans unset), bit for bit."""
    if quantize is not None and not (blocks_cpu.available() and int8_cpu.available()):
        pytest.skip("the int8 and int4 CPU kernels need AVX-512 VNNI")
    model = Llama.build(tiny_checkpoint(1), max_seq_len=64, max_batch_size=4, device="cpu", dtype=torch.bfloat16,
                        quantize=quantize).model
    blocks = list(model.layers)
    plans = [block.plan for block in blocks]
    assert [type(block) for block in blocks] == [Bf16TransformerBlock] * 2 and None not in plans
    calls = []
    decode_layer = bf16_cpu.decode_layer
    monkeypatch.setattr(bf16_cpu, "decode_layer", lambda *args: calls.append(1) or decode_layer(*args))
    generator = torch.Generator().manual_seed(0)
    prompt, token = torch.randint(0, 1000, (3, 12), generator=generator), torch.randint(0, 1000, (3, 1))
    with torch.inference_mode():
        model.step(prompt, torch.zeros(3, dtype=torch.long), slot=1, kv_len=12)
        cached = [(block.attention.kv_cache.k.clone(), block.attention.kv_cache.v.clone()) for block in blocks]
        results = []
        for use_plans in (True, False):
            for block, plan, (k, v) in zip(blocks, plans, cached):
                block.plan = plan if use_plans else None
                block.attention.kv_cache.k.copy_(k)
                block.attention.kv_cache.v.copy_(v)
            logits = model.step(token, torch.tensor([12, 9, 11]), slot=1, kv_len=13)
            results.append([logits] + [t.clone() for block in blocks for t in block.attention.kv_cache.buffers()])
            assert len(calls) == (2 if use_plans else 0)
            calls.clear()
    assert all(torch.equal(fused, own) for fused, own in zip(*results))
    assert not torch.equal(results[0][1], cached[0][0])  # the step did write its keys


@needs_bf16
def test_a_decode_step_outside_the_cache_is_refused_before_anything_is_written(tiny_checkpoint):
    model = _build(tiny_checkpoint).model
    model.setup_caches()
    block, x = model.layers[0], torch.randn(1, 1, model.args.dim).bfloat16()
    with pytest.raises(ValueError, match=r"positions \[64\] must lie in \[0, max_seq_len=64\)"):
        block(x, torch.tensor([[64]]), model.rope[torch.tensor([[0]])], None, 0, None)
    with pytest.raises(ValueError, match=r"slots \[2, 3\) are outside the cache's 2"):
        block(x, torch.tensor([[0]]), model.rope[torch.tensor([[0]])], None, 2, None)
    assert all(t.abs().sum() == 0 for block in model.layers for t in block.attention.kv_cache.buffers())


@needs_bf16
def test_hooks_and_replaced_modules_are_never_skipped_by_a_blocks_one_call(tiny_checkpoint, monkeypatch):
    """A forward hook on a block's module (a probe, tensor parallelism's all-reduce), or a module replaced after the
    plan was made, sends the block's decode steps back through its modules."""
    model = _build(tiny_checkpoint).model
    model.setup_caches()
    calls, seen = [], []
    decode_layer = bf16_cpu.decode_layer
    monkeypatch.setattr(bf16_cpu, "decode_layer", lambda *args: calls.append(1) or decode_layer(*args))

    def decode(position: int) -> None:
        with torch.inference_mode():
            model.step(torch.tensor([[7]]), torch.tensor([position]), kv_len=position + 1)

    decode(0)
    assert len(calls) == 2
    handle = model.layers[1].feed_forward.w2.register_forward_hook(lambda module, inputs, out: seen.append(out.shape))
    decode(1)
    assert len(calls) == 3 and seen == [(1, 1, model.args.dim)]  # block 0 in one call, block 1 through its modules
    handle.remove()
    wo, used = llama.kernels.plain_linear(torch.zeros(model.args.dim, model.args.dim).bfloat16()), []
    wo.forward = lambda x, forward=wo.forward: used.append(x.shape) or forward(x)
    model.layers[0].attention.wo = wo
    decode(2)
    assert len(calls) == 4 and used == [(1, 1, model.args.dim)]  # block 1 in one call again; block 0 uses its new wo


@needs_bf16
def test_float32_models_keep_torchs_attention_and_norms(tiny_checkpoint):
    model = Llama.build(tiny_checkpoint(1), max_seq_len=16, max_batch_size=1, device="cpu",
                        dtype=torch.float32).model
    assert not any(isinstance(m, Attention) and m.decode_step for m in model.modules())
    assert not any(isinstance(m, (Bf16RMSNorm, Bf16Linear)) for m in model.modules())


@needs_bf16
def test_a_layer_keeps_only_its_packed_weight_and_computes_every_row_count_with_the_kernel(monkeypatch):
    weight = torch.randn(40, 64).bfloat16()
    layer = Bf16Linear(weight)
    assert layer.weight.is_meta and layer.weight.shape == (40, 64) and layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.packed, bf16_cpu.pack(weight)) and "packed" not in layer.state_dict()
    calls = []
    monkeypatch.setattr(bf16_cpu, "linear",
                        lambda x, packed, n, widen: calls.append(x.shape[0]) or x.new_zeros(x.shape[0], n))
    for rows in (1, 4, 5, 512):
        layer(torch.randn(rows, 64).bfloat16())
    assert calls == [1, 4, 5, 512]


@needs_bf16
def test_compiled_decoding_calls_the_kernel_with_each_layers_own_weight(tiny_checkpoint, monkeypatch):
    built = {compile: Llama.build(tiny_checkpoint(1), device="cpu", dtype=torch.bfloat16, max_seq_len=32,
                                  max_batch_size=2, compile=compile) for compile in (False, True)}
    calls = []
    original = bf16_cpu.bf16_linear
    monkeypatch.setattr(bf16_cpu, "bf16_linear",
                        lambda x, packed, *rest: calls.append(packed) or original(x, packed, *rest))
    tokens = torch.tensor([[128000, 791, 6864, 315, 9822, 374]])
    outputs = []
    for llama_ in (built[False], built[True]):
        starts = torch.zeros(1, dtype=torch.int64)
        llama_.engine.forward(tokens[:, :5], starts, kv_len=5, last_logits_only=True)
        outputs.append(llama_.engine.forward(tokens[:, 5:], starts + 5, kv_len=6, last_logits_only=True))
    layers = [m for m in built[True].model.modules() if isinstance(m, Bf16Linear)]
    assert {id(packed) for packed in calls} == {id(layer.packed) for layer in layers}  # traced through each layer
    eager, compiled = outputs
    assert (compiled - eager).abs().max().item() <= 2e-2 * eager.abs().max().item()
