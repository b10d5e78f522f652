"""GGUF import (`python -m llama.checkpoint from_gguf`), checked against independent implementations: GGUF files
written here with the gguf package the way llama.cpp's converter lays out a Llama 3 model, Meta's own tokenizer
file, and transformers' own GGUF loader."""

import math
import subprocess
import sys
from pathlib import Path

import gguf  # the test extra installs it
import numpy as np
import pytest
import torch

from llama.args import PRESETS, ModelArgs
from llama.checkpoint.gguf import convert_from_gguf, rope_scaling_from_factors
from llama.checkpoint.load import load_model, load_shard, read_params, shard_paths

REPO = Path(__file__).resolve().parent.parent
TOKENS = torch.randint(0, 128256, (1, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def llama31_rope_factors(args: ModelArgs, factor: float) -> torch.Tensor:
    """What llama.cpp's converter stores as rope_freqs.weight for Llama 3.1 scaling: for each frequency of a head,
    1 above 4 / 8192 rotations per position, `factor` below 1 / 8192, a smooth blend of the two between."""
    values = []
    for i in range(args.head_dim // 2):
        wavelength = 2 * math.pi * args.rope_theta ** (2 * i / args.head_dim)
        if wavelength < 8192 / 4:
            values.append(1.0)
        elif wavelength > 8192:
            values.append(factor)
        else:
            smooth = (8192 / wavelength - 1) / (4 - 1)
            values.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(values, dtype=torch.float32)


def llama_cpp_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter's reordering of HF's q/k rows: per head, [first halves, second halves] -> pairs."""
    rows, cols = weight.shape
    return weight.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


@pytest.fixture(scope="module")
def vocabulary(meta_tokenizer) -> tuple[list[str], list[int]]:
    """Llama 3's tokens as GGUF stores them (GPT-2 byte-level strings, from Meta's tiktoken tokenizer and
    transformers' byte table) and their token types (1 normal, 3 control)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    char = bytes_to_unicode()
    encoding = meta_tokenizer.model
    ordinary = ["".join(char[b] for b in encoding.decode_single_token_bytes(i)) for i in range(128000)]
    specials = [name for name, _ in sorted(meta_tokenizer.special_tokens.items(), key=lambda item: item[1])]
    return ordinary + specials, [1] * len(ordinary) + [3] * len(specials)


def random_k_blocks(kind, rows: int, columns: int, seed: int = 0) -> np.ndarray:
    """Random K-quant blocks (Q3_K, Q4_K, Q5_K, Q6_K) for a (rows, columns) weight: random bytes, with float16 d
    (and dmin) that keep the values below about 0.2. gguf's own quantizer does not write K-quants."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    values, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(rows, columns // values, size), dtype=np.uint8)
    # Q6_K: d last, over signed 8-bit scales of values in -32..31; Q3_K: d last, over 6-bit scales of -4..3;
    # Q4_K/Q5_K: d, dmin first, over 6-bit scales
    places, high = {Q.Q6_K: ([size - 2], 4e-5), Q.Q3_K: ([size - 2], 1e-3), Q.Q4_K: ([0, 2], 1.5e-4)}.get(
        kind, ([0, 2], 7e-5))
    for at in places:
        halves = rng.uniform(high / 4, high, size=raw.shape[:2]).astype(np.float16)
        raw[..., at:at + 2] = halves.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


def write_gguf(path: Path, ckpt: Path, vocabulary, *, arch: str = "llama", model: str = "gpt2",
               pre: str = "llama-bpe", rope_factors: torch.Tensor | None = None, tied: bool = False,
               ffn_length: bool = True, weights: bool = True, types: dict | None = None) -> Path:
    """The tiny checkpoint as llama.cpp lays out a Llama 3 model: HF's weights with q/k rows reordered, 1-D
    tensors F32, the embedding F16, q/k/output Q8_0 and the rest F32, plus rope_freqs for 3.1 scaling.
    `types` gives other types by llama.cpp's short names (e.g. {"ffn_down": Q4_0}; K-quants get random blocks).
    The keywords make it wrong in one way (`weights=False`: none of the model's tensors, for refusals)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from llama.checkpoint.hf import meta_to_hf_state_dict

    args = ModelArgs.from_params(read_params(ckpt))
    hf = {k: v.float() for k, v in meta_to_hf_state_dict(load_shard(ckpt / "consolidated.00.pth"), args).items()}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name("tiny")
    writer.add_context_length(131072)
    writer.add_block_count(args.n_layers)
    writer.add_embedding_length(args.dim)
    if ffn_length:
        writer.add_feed_forward_length(args.ffn_hidden_dim)
    writer.add_head_count(args.n_heads)
    writer.add_head_count_kv(args.n_kv_heads)
    writer.add_rope_freq_base(args.rope_theta)
    writer.add_layer_norm_rms_eps(args.norm_eps)
    writer.add_vocab_size(args.vocab_size)
    writer.add_rope_dimension_count(args.head_dim)
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocabulary[0])
    writer.add_token_types(vocabulary[1])
    writer.add_bos_token_id(128000)
    writer.add_eos_token_id(128009)

    def add(name: str, weight: torch.Tensor, kind=Q.F32) -> None:
        kind = (types or {}).get(name.split(".")[-2], kind)
        array = weight.numpy()
        if kind == Q.F16:
            writer.add_tensor(name, array.astype("float16"))
        elif kind in (Q.Q4_K, Q.Q5_K, Q.Q6_K):
            writer.add_tensor(name, random_k_blocks(kind, *array.shape, seed=len(name)), raw_dtype=kind)
        elif kind != Q.F32:
            writer.add_tensor(name, quantize(array, kind), raw_dtype=kind)
        else:
            writer.add_tensor(name, array)

    if rope_factors is not None:
        add("rope_freqs.weight", rope_factors)
    if weights:
        add_weights(add, hf, args, tied)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_weights(add, hf: dict[str, torch.Tensor], args: ModelArgs, tied: bool) -> None:
    from gguf import GGMLQuantizationType as Q

    add("token_embd.weight", hf["model.embed_tokens.weight"], Q.F16)
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", llama_cpp_rows(hf[p + "self_attn.q_proj.weight"], args.n_heads), Q.Q8_0)
        add(f"blk.{i}.attn_k.weight", llama_cpp_rows(hf[p + "self_attn.k_proj.weight"], args.n_kv_heads), Q.Q8_0)
        add(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", hf[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", hf[p + "mlp.down_proj.weight"], Q.F16)
    add("output_norm.weight", hf["model.norm.weight"])
    if not tied:
        add("output.weight", hf["lm_head.weight"], Q.Q8_0)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_checkpoint, vocabulary, tmp_path_factory) -> Path:
    ckpt = tiny_checkpoint(1)
    factors = llama31_rope_factors(ModelArgs.from_params(read_params(ckpt)), 8.0)
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", ckpt, vocabulary, rope_factors=factors)


@pytest.fixture(scope="module")
def imported(tiny_gguf, tmp_path_factory) -> Path:
    return convert_from_gguf(tiny_gguf, tmp_path_factory.mktemp("meta") / "tiny", dtype="float32", dequantize=True)


def our_logits(ckpt: Path) -> torch.Tensor:
    args = ModelArgs.from_params(read_params(ckpt), max_seq_len=TOKENS.shape[1], max_batch_size=1)
    return load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.float32)(TOKENS)


def test_params_and_tokenizer(imported, tokenizer_path):
    assert read_params(imported) == PRESETS["tiny"]  # use_scaled_rope, and the factor 8 (Meta's default) unwritten
    assert (imported / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    assert (imported / "checklist.chk").is_file()


def test_tensors_keep_their_values(imported, tiny_checkpoint):
    ours = load_shard(imported / "consolidated.00.pth")
    original = load_shard(tiny_checkpoint(1) / "consolidated.00.pth")
    assert list(ours) == list(original) and all(t.dtype == torch.float32 for t in ours.values())
    # F32 tensors come back bit for bit; Q8_0 ones (q, k, output) within its 8-bit steps of each block's largest.
    assert torch.equal(ours["layers.1.attention.wv.weight"], original["layers.1.attention.wv.weight"].float())
    assert torch.equal(ours["layers.0.attention_norm.weight"], original["layers.0.attention_norm.weight"].float())
    for key in ("layers.0.attention.wq.weight", "layers.1.attention.wk.weight", "output.weight"):
        assert (ours[key] - original[key].float()).abs().max() <= original[key].float().abs().max() / 127


def test_logits_match_transformers_gguf_loader(imported, tiny_gguf, rel_err):
    """transformers reads the same file on its own (its GGUF reader dequantizes, and turns q/k rows back to HF's
    order). Its `from_pretrained(gguf_file=...)` also wants the accelerate package, so its reader is called
    directly; it ignores rope_freqs.weight, so the model is told the Llama 3.1 scaling in its config."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from llama.checkpoint.hf_config import hf_config_dict

    model = LlamaForCausalLM(LlamaConfig(**hf_config_dict(ModelArgs.from_params(PRESETS["tiny"])))).eval()
    parsed = load_gguf_checkpoint(tiny_gguf, return_tensors=True, model_to_load=model)
    assert {k: parsed["config"][k] for k in ("hidden_size", "num_key_value_heads", "intermediate_size")} == {
        "hidden_size": 64, "num_key_value_heads": 2, "intermediate_size": 224}
    model.load_state_dict(parsed["tensors"], strict=True)
    with torch.no_grad():
        ref = model(TOKENS).logits
    error = rel_err(our_logits(imported), ref)
    print(f"rel. error vs transformers' GGUF reader: {error:.2e}")
    assert error <= 1e-4
    # The q/k row order matters: read as HF's order (not reordered back), the logits would be far off.
    for name, tensor in parsed["tensors"].items():
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = 4 if name.endswith("q_proj.weight") else 2
            tensor.copy_(llama_cpp_rows(tensor.clone(), heads))
    model.load_state_dict(parsed["tensors"], strict=True)
    with torch.no_grad():
        assert rel_err(our_logits(imported), model(TOKENS).logits) > 100 * 1e-4


def test_cli_two_shards_equal_one(imported, tiny_gguf, tmp_path, rel_err):
    dst = tmp_path / "mp2"
    done = subprocess.run([sys.executable, "-m", "llama.checkpoint", "from_gguf", str(tiny_gguf), str(dst),
                           "--model_parallel_size", "2", "--dtype", "float32", "--dequantize"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(dst) and len(shard_paths(dst)) == 2
    assert read_params(dst) == read_params(imported)
    assert rel_err(our_logits(dst), our_logits(imported)) <= 1e-6


def test_cli_refuses_a_misspelt_flag_before_work(tiny_gguf, tmp_path):
    done = subprocess.run([sys.executable, "-m", "llama.checkpoint", "from_gguf", str(tiny_gguf), str(tmp_path / "x"),
                           "--model_paralel_size", "2"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "unknown flag --model_paralel_size" in done.stderr and "--model_parallel_size" in done.stderr
    assert not (tmp_path / "x").exists()


def test_tied_embeddings_become_a_separate_output(tiny_checkpoint, vocabulary, tmp_path):
    file = write_gguf(tmp_path / "tied.gguf", tiny_checkpoint(1), vocabulary, tied=True)
    meta = convert_from_gguf(file, tmp_path / "meta", dequantize=True)  # bfloat16, the default
    shard = load_shard(meta / "consolidated.00.pth")
    assert shard["output.weight"].dtype == torch.bfloat16
    assert torch.equal(shard["output.weight"], shard["tok_embeddings.weight"])
    assert read_params(meta) == {**PRESETS["tiny"], "use_scaled_rope": False}  # no rope_freqs: no scaling


def test_rope_factor_is_recovered():
    args = ModelArgs.from_params({**PRESETS["tiny"], "dim": 128})  # head_dim 32: every band of the scaling
    assert rope_scaling_from_factors(llama31_rope_factors(args, 32.0), args, "f.gguf") == {
        "use_scaled_rope": True, "rope_scaling_factor": 32.0}
    assert rope_scaling_from_factors(llama31_rope_factors(args, 8.0), args, "f.gguf") == {"use_scaled_rope": True}
    assert rope_scaling_from_factors(torch.ones(16), args, "f.gguf") == {"use_scaled_rope": False}
    linear = torch.full((16,), 4.0)  # linear scaling: every frequency slowed down
    with pytest.raises(ValueError, match=r"^f\.gguf: rope_freqs\.weight \(4, 4, .* is not what Llama 3\.1"):
        rope_scaling_from_factors(linear, args, "f.gguf")


def test_refusals_are_one_line(tiny_checkpoint, vocabulary, tmp_path):
    ckpt = tiny_checkpoint(1)
    args = ModelArgs.from_params(read_params(ckpt))
    bad_rope = llama31_rope_factors(args, 8.0) * 1.5
    few = (["!", "\""], [1, 1])  # refused before the vocabulary is read
    cases = {
        "arch": (dict(arch="qwen2"), few, r"general\.architecture is 'qwen2'; only 'llama'"),
        "model": (dict(model="llama"), few, r"tokenizer\.ggml\.model is 'llama'; only 'gpt2'"),
        "pre": (dict(pre="qwen2"), few, r"tokenizer\.ggml\.pre is 'qwen2'; .* not supported yet"),
        "vocab": ({}, few, r"the vocabulary \(2 tokens\) is not Llama 3's"),
        "key": (dict(ffn_length=False), vocabulary, r"lacks the metadata key llama\.feed_forward_length"),
        "rope": (dict(rope_factors=bad_rope), vocabulary, r"rope_freqs\.weight \(1\.5, .* is not what Llama 3\.1"),
    }
    for name, (options, tokens, message) in cases.items():
        file = write_gguf(tmp_path / f"{name}.gguf", ckpt, tokens, weights=False, **options)
        with pytest.raises(ValueError, match=message) as refused:
            convert_from_gguf(file, tmp_path / name)
        assert "\n" not in str(refused.value) and str(file) in str(refused.value)
        assert not (tmp_path / name).exists()
