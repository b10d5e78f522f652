"""GGUF files keep their quantization: `from_gguf` stores Q8_0, Q4_0 and Q4_1 blocks as they are, converts
K-quants once (with the error printed), and the model computes with the blocks. Checked against the gguf package's
own dequantization and against the same file imported with --dequantize (Meta's layout, float32)."""

import subprocess
import sys
from pathlib import Path

import gguf  # the test extra installs it
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from test_gguf import random_k_blocks, vocabulary, write_gguf  # noqa: F401  (vocabulary: the fixture)

from llama.args import ModelArgs
from llama.block_quant import Q4Blocks, Q8Blocks, dequantize
from llama.checkpoint.gguf import convert_from_gguf
from llama.checkpoint.gguf_blocks import ImportReport, read_weight
from llama.checkpoint.load import load_model, load_shard, read_params, shard_paths
from llama.checkpoint.reshard import reshard_checkpoint
from llama.kernels import BlockEmbedding, ConcatLinear

REPO = Path(__file__).resolve().parent.parent
TOKENS = torch.randint(0, 128256, (1, 48), generator=torch.Generator().manual_seed(0))
# The tiny model with every kept type: Q4_0 and Q4_1 layers, a Q8_0 embedding tied to the output, F16 and F32 ones.
KEPT_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.Q4_1,
              "ffn_gate": Q.Q4_0, "ffn_up": Q.Q4_1, "ffn_down": Q.F16}
# A Q4_K_M file's mix: Q4_K mostly, Q6_K for v and ffn_down (so wq/wk/wv mix two forms), and Q5_K here for wo.
K_TYPES = {"token_embd": Q.Q4_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K, "attn_output": Q.Q5_K,
           "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K}


def raw_tensor(tmp_path: Path, kind, rows: int = 8, columns: int = 512):
    """A gguf ReaderTensor of `kind` holding random blocks (K-quants) or a random weight quantized by gguf."""
    file = tmp_path / f"{kind.name}.gguf"
    writer = gguf.GGUFWriter(file, "llama")
    if kind in (Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K):
        writer.add_tensor("w", random_k_blocks(kind, rows, columns), raw_dtype=kind)
    else:
        weight = np.random.default_rng(0).normal(0, 0.02, size=(rows, columns)).astype(np.float32)
        writer.add_tensor("w", gguf.quants.quantize(weight, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(file, "r").tensors[0]


def relative_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).double().square().sum() / b.double().square().sum()).sqrt().item()


@pytest.mark.parametrize("kind", [Q.Q8_0, Q.Q4_0, Q.Q4_1], ids=lambda kind: kind.name)
def test_kept_blocks_hold_exactly_what_gguf_dequantizes(kind, tmp_path):
    tensor = raw_tensor(tmp_path, kind)
    report = ImportReport(torch.bfloat16)
    blocks = read_weight(tensor, torch.bfloat16, report)
    assert isinstance(blocks, Q8Blocks if kind == Q.Q8_0 else Q4Blocks) and blocks.shape == (8, 512)
    expected = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type))
    assert torch.equal(dequantize(blocks), expected)
    # The bytes are GGUF's own: a block's values (32 bytes, or 16 of two nibbles) follow its float16 scale (and min).
    first, size = {Q.Q8_0: (2, 32), Q.Q4_0: (2, 16), Q.Q4_1: (4, 16)}[kind]
    assert torch.equal(blocks.values[0, :size].view(torch.uint8),
                       torch.from_numpy(np.array(tensor.data[0, first:first + size])))
    bits = 8 if kind == Q.Q8_0 else 4
    assert report.lines() == [f"{kind.name}: 1 tensor(s) kept as they are ({bits}-bit blocks)"]


@pytest.mark.parametrize("kind, form, bound", [(Q.Q4_K, Q4Blocks, 1e-3), (Q.Q5_K, Q8Blocks, 1e-2),
                                               (Q.Q6_K, Q8Blocks, 1e-2), (Q.Q5_0, Q8Blocks, 1e-2)],
                         ids=lambda value: getattr(value, "name", ""))
def test_converted_types_are_near_what_gguf_dequantizes_and_the_error_is_printed(kind, form, bound, tmp_path,
                                                                                monkeypatch):
    """Q4_K's scales and mins become float16 products (rounding only); the others are requantized to Q8_0.
    Converted a few rows at a time (here 3 of 8), which the result does not show."""
    from llama.checkpoint import gguf_blocks

    monkeypatch.setattr(gguf_blocks, "CHUNK_VALUES", 3 * 512)
    tensor = raw_tensor(tmp_path, kind)
    report = ImportReport(torch.bfloat16)
    blocks = read_weight(tensor, torch.bfloat16, report)
    expected = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type))
    error = relative_rms(dequantize(blocks), expected)
    assert isinstance(blocks, form) and 0 < error <= bound
    (line,) = report.lines()
    assert line.startswith(f"{kind.name}: 1 tensor(s) ") and line.endswith(f"relative RMS error {error:.2e} against "
                                                                           "gguf's dequantization")


def test_types_without_a_block_form_are_dequantized_and_said_so(tmp_path):
    tensor = raw_tensor(tmp_path, Q.Q3_K)
    report = ImportReport(torch.float16)
    weight = read_weight(tensor, torch.float16, report)
    expected = torch.from_numpy(gguf_dequantize(tensor.data, tensor.tensor_type)).half()
    assert weight.dtype == torch.float16 and torch.equal(weight, expected)
    assert report.lines() == ["Q3_K: 1 tensor(s) dequantized to float16 (no block form here keeps this type)"]


@pytest.fixture(scope="module")
def kept_gguf(tiny_checkpoint, vocabulary, tmp_path_factory) -> Path:  # noqa: F811
    return write_gguf(tmp_path_factory.mktemp("gguf") / "kept.gguf", tiny_checkpoint(1), vocabulary, tied=True,
                      types=KEPT_TYPES)


@pytest.fixture(scope="module")
def dequantized(kept_gguf, tmp_path_factory) -> Path:
    return convert_from_gguf(kept_gguf, tmp_path_factory.mktemp("deq") / "ckpt", dtype="float32", dequantize=True)


@pytest.fixture(scope="module")
def blocks_checkpoint(kept_gguf, tmp_path_factory) -> Path:
    return convert_from_gguf(kept_gguf, tmp_path_factory.mktemp("blocks") / "ckpt", dtype="float32")


def logits(ckpt: Path, **kwargs) -> torch.Tensor:
    args = ModelArgs.from_params(read_params(ckpt), max_seq_len=TOKENS.shape[1], max_batch_size=1)
    with torch.no_grad():
        return load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.float32, **kwargs)(TOKENS)


def test_the_checkpoint_stores_gguf_blocks_once_and_says_so_in_params(blocks_checkpoint, dequantized, kept_gguf):
    shard = load_shard(blocks_checkpoint / "consolidated.00.pth")
    assert read_params(blocks_checkpoint) == {**read_params(dequantized), "quantization": "gguf_blocks"}
    assert shard["layers.0.attention.wq.weight.q4_values"].dtype == torch.uint8
    assert shard["layers.0.attention.wv.weight.q8_values"].dtype == torch.int8
    assert shard["tok_embeddings.weight.q8_scales"].shape == (128256, 2)  # 64 columns: 2 blocks a row
    assert shard["layers.0.feed_forward.w2.weight"].dtype == torch.float32  # F16: floating point, in --dtype
    assert not any(key.startswith("output.") for key in shard)  # tied: the embedding, stored once
    # The blocks themselves are the file's: dequantized here as the --dequantize import dequantized them.
    deq = load_shard(dequantized / "consolidated.00.pth")
    q = Q4Blocks(*(shard[f"layers.1.attention.wk.weight.q4_{part}"] for part in ("values", "scales", "mins")))
    assert torch.equal(dequantize(q), deq["layers.1.attention.wk.weight"])
    listed = (blocks_checkpoint / "checklist.chk").read_text()
    assert sorted(line.split()[1] for line in listed.splitlines()) == sorted(
        p.name for p in blocks_checkpoint.iterdir() if p.name != "checklist.chk")
    assert (blocks_checkpoint / "consolidated.00.pth").stat().st_size < (
        dequantized / "consolidated.00.pth").stat().st_size / 3


def test_the_command_prints_one_line_per_type_on_stderr(kept_gguf, tmp_path):
    dst = tmp_path / "ckpt"
    done = subprocess.run([sys.executable, "-m", "llama.checkpoint", "from_gguf", str(kept_gguf), str(dst)],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(dst)
    assert done.stderr.splitlines() == [
        "kept.gguf: F16: 2 tensor(s) kept in floating point as bfloat16",
        "kept.gguf: Q4_0: 4 tensor(s) kept as they are (4-bit blocks)",
        "kept.gguf: Q4_1: 6 tensor(s) kept as they are (4-bit blocks)",
        "kept.gguf: Q8_0: 3 tensor(s) kept as they are (8-bit blocks)"]


def test_the_model_computes_with_the_blocks_as_with_their_dequantized_values(blocks_checkpoint, dequantized,
                                                                             rel_err):
    """Block kernels quantize the activations per block of 32 (as llama.cpp does), hence the tolerance."""
    args = ModelArgs.from_params(read_params(blocks_checkpoint), max_seq_len=TOKENS.shape[1], max_batch_size=1)
    model = load_model(blocks_checkpoint, args, 0, 1, torch.device("cpu"), torch.float32)
    assert isinstance(model.tok_embeddings, BlockEmbedding) and model.tok_embeddings.layer is model.output
    with torch.no_grad():
        ours = model(TOKENS)
    error = rel_err(ours, logits(dequantized))
    print(f"rel. error of the logits against the dequantized checkpoint: {error:.2e}")
    assert error <= 2e-2


def test_k_quants_are_converted_once_and_mixed_forms_stack(tmp_path, vocabulary, rel_err):  # noqa: F811
    """A Q4_K_M-like file: Q4_K weights become 4-bit blocks, Q5_K/Q6_K ones 8-bit blocks; wq/wk (Q4_K) and wv
    (Q6_K) then compute side by side. The dequantized import holds gguf's own values."""
    from llama.checkpoint.random_weights import write_random_checkpoint

    shape = {"dim": 256, "n_layers": 1, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 128256, "multiple_of": 256,
             "ffn_dim_multiplier": None, "norm_eps": 1e-05, "rope_theta": 500000.0}
    source = write_random_checkpoint(tmp_path / "src", shape, 1, seed=0)
    file = write_gguf(tmp_path / "k.gguf", source, vocabulary, tied=True, types=K_TYPES)
    blocks = convert_from_gguf(file, tmp_path / "blocks", dtype="float32")
    deq = convert_from_gguf(file, tmp_path / "deq", dtype="float32", dequantize=True)
    args = ModelArgs.from_params(read_params(blocks), max_seq_len=TOKENS.shape[1], max_batch_size=1)
    model = load_model(blocks, args, 0, 1, torch.device("cpu"), torch.float32)
    assert isinstance(model.layers[0].attention.wqkv, ConcatLinear)
    assert not isinstance(model.layers[0].feed_forward.w13, ConcatLinear)  # w1 and w3: one Q4 layer
    with torch.no_grad():
        error = rel_err(model(TOKENS), logits(deq))
    print(f"rel. error of the logits against gguf's dequantized values: {error:.2e}")
    assert error <= 5e-2


def test_shards_split_blocks_at_block_boundaries_and_reshard_bit_for_bit(kept_gguf, blocks_checkpoint, tmp_path,
                                                                          rel_err):
    two = convert_from_gguf(kept_gguf, tmp_path / "mp2", model_parallel_size=2, dtype="float32")
    assert len(shard_paths(two)) == 2
    assert load_shard(shard_paths(two)[1])["layers.0.attention.wo.weight.q4_values"].shape == (64, 16)  # 32 columns
    assert rel_err(logits(two), logits(blocks_checkpoint)) <= 1e-6
    back = reshard_checkpoint(two, tmp_path / "mp1", 1)
    ours, original = load_shard(back / "consolidated.00.pth"), load_shard(blocks_checkpoint / "consolidated.00.pth")
    assert list(ours) == list(original) and all(torch.equal(ours[key], original[key]) for key in ours)


def test_each_process_holds_its_rows_of_a_tied_block_embedding(blocks_checkpoint):
    """Under model parallelism each process looks up only its slice of the vocabulary (zeros elsewhere, added up
    across processes) and its output layer is that same slice of the embedding."""
    args = ModelArgs.from_params(read_params(blocks_checkpoint), max_seq_len=8, max_batch_size=1)
    whole = load_model(blocks_checkpoint, args, 0, 1, torch.device("cpu"), torch.float32)
    halves = [load_model(blocks_checkpoint, args, rank, 2, torch.device("cpu"), torch.float32) for rank in (0, 1)]
    x = torch.randn(3, args.dim)
    with torch.no_grad():  # forward(): without the collectives that join_shards hooks on
        assert torch.equal(sum(half.tok_embeddings.forward(TOKENS) for half in halves), whole.tok_embeddings(TOKENS))
        assert torch.equal(torch.cat([half.output.forward(x) for half in halves], -1), whole.output(x))


def test_blocks_refuse_what_cannot_take_them_in_one_line(kept_gguf, blocks_checkpoint, tiny_checkpoint,
                                                         vocabulary, tmp_path):  # noqa: F811
    from llama.checkpoint.hf import convert_to_hf
    from llama.validation import check_quantize_shapes

    with pytest.raises(ValueError, match=r"stores its weights as GGUF blocks .* again with --dequantize") as refused:
        convert_to_hf(blocks_checkpoint, tmp_path / "hf")
    args = ModelArgs.from_params(read_params(blocks_checkpoint))
    with pytest.raises(ValueError, match=r"^quantize='int4' cannot apply to a checkpoint whose weights are already "
                                         r"quantized .*pass quantize=None"):
        check_quantize_shapes("int4", args, 1)
    # ffn_down in blocks: the tiny model's 224 hidden units split in two at column 112, inside a block.
    file = write_gguf(tmp_path / "down.gguf", tiny_checkpoint(1), vocabulary, types={"ffn_down": Q.Q4_0})
    with pytest.raises(ValueError, match=r"feed_forward\.w2\.weight is stored in blocks of 32 columns and cannot be "
                                         r"split at column 112") as split:
        convert_from_gguf(file, tmp_path / "mp2", model_parallel_size=2)
    assert "\n" not in str(refused.value) + str(split.value) and not (tmp_path / "mp2").exists()


def test_the_memory_check_counts_what_the_blocks_store(blocks_checkpoint, monkeypatch):
    """Not the half byte per linear weight of a float checkpoint quantized at load: the shard files' bytes."""
    from llama.checkpoint import load

    args = ModelArgs.from_params(read_params(blocks_checkpoint), max_seq_len=8, max_batch_size=1)
    stored = (blocks_checkpoint / "consolidated.00.pth").stat().st_size
    kv_cache = 2 * args.n_layers * 8 * args.n_kv_heads * args.head_dim * 4  # keys and values, float32
    monkeypatch.setattr(load, "_device_memory", lambda device: stored + kv_cache)
    load.check_fits(blocks_checkpoint, args, 1, torch.device("cpu"), torch.float32)
    monkeypatch.setattr(load, "_device_memory", lambda device: stored + kv_cache - 1)
    with pytest.raises(ValueError, match=rf"its weights need at least {stored / 1e9:.3g} GB in each of 1 process"):
        load.check_fits(blocks_checkpoint, args, 1, torch.device("cpu"), torch.float32)


def test_a_file_without_quantized_tensors_gives_metas_layout(tiny_checkpoint, vocabulary, tmp_path):  # noqa: F811
    floats = {"attn_q": Q.F32, "attn_k": Q.F16, "output": Q.F32}
    file = write_gguf(tmp_path / "f.gguf", tiny_checkpoint(1), vocabulary, types=floats)
    ckpt = convert_from_gguf(file, tmp_path / "ckpt", dtype="float32")
    assert "quantization" not in read_params(ckpt)
    original = load_shard(tiny_checkpoint(1) / "consolidated.00.pth")
    assert list(load_shard(ckpt / "consolidated.00.pth")) == list(original)  # output.weight included
