"""Hugging Face <-> Meta conversion, checked against transformers' own LlamaForCausalLM and tokenizer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llama.args import PRESETS, ModelArgs
from llama.checkpoint.hf import convert_from_hf, convert_to_hf
from llama.checkpoint.hf_config import ffn_params_for, params_from_hf_config
from llama.checkpoint.load import load_model, load_shard, read_params, shard_paths
from llama.checkpoint.random_weights import write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
SEQLEN = 2048  # long enough that the scaled bands (and so the factor) change the logits


def our_logits(ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    args = ModelArgs.from_params(read_params(ckpt), max_seq_len=tokens.shape[1], max_batch_size=tokens.shape[0])
    model = load_model(ckpt, args, 0, 1, torch.device("cpu"), torch.float32)
    return model(tokens)


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(hf_dir, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens_for(vocab_size: int, seqlen: int = SEQLEN) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def scaled_params(small_params) -> dict:
    """The small model with Llama 3.1 rope scaling by a factor of 32, as in HF's Llama 3.2 configs."""
    return {**small_params, "use_scaled_rope": True, "rope_scaling_factor": 32.0}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_hf(tiny_checkpoint, tmp_path_factory) -> Path:
    """The 2-shard tiny checkpoint converted to HF, with its tokenizer."""
    return convert_to_hf(tiny_checkpoint(2), tmp_path_factory.mktemp("hf") / "tiny-hf")


@pytest.mark.parametrize("k", [1, 2])
def test_meta_hf_meta_is_bit_identical(tiny_checkpoint, tiny_hf, tmp_path, k):
    back = convert_from_hf(tiny_hf, tmp_path / "back", model_parallel_size=k)
    assert ModelArgs.from_params(read_params(back)) == ModelArgs.from_params(read_params(tiny_checkpoint(k)))
    assert read_params(back) == PRESETS["tiny"]
    # Shard by shard: the same keys, dtypes and bits as the checkpoint written with k shards.
    for ours, original in zip(shard_paths(back), shard_paths(tiny_checkpoint(k)), strict=True):
        a, b = load_shard(ours), load_shard(original)
        assert list(a) == list(b)
        assert all(a[key].dtype == b[key].dtype == torch.bfloat16 and torch.equal(a[key], b[key]) for key in a)
    assert (back / "tokenizer.model").read_bytes() == (tiny_checkpoint(1) / "tokenizer.model").read_bytes()
    assert (back / "checklist.chk").is_file()


def test_to_hf_from_one_shard_equals_from_two(tiny_checkpoint, tiny_hf, tmp_path):
    from safetensors.torch import load_file

    one = convert_to_hf(tiny_checkpoint(1), tmp_path / "one", tokenizer=False)
    a, b = load_file(one / "model.safetensors"), load_file(tiny_hf / "model.safetensors")
    assert list(a) == list(b) and all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((one / "config.json").read_text()) == json.loads((tiny_hf / "config.json").read_text())


def test_tiny_to_hf_logits_match(rel_err, tiny_checkpoint, tiny_hf):
    tokens = tokens_for(128256, 64)
    assert rel_err(hf_logits(tiny_hf, tokens), our_logits(tiny_checkpoint(2), tokens)) <= 1e-4


def test_to_hf_logits_match_with_rope_factor_32(rel_err, scaled_params, tmp_path):
    ckpt = write_random_checkpoint(tmp_path / "small", scaled_params, model_parallel_size=2, seed=3, dtype=torch.float32)
    with pytest.warns(UserWarning, match="vocab_size is 512; no HF tokenizer is written") as warned:
        hf_dir = convert_to_hf(ckpt, tmp_path / "hf", max_shard_size="300KB")
    assert {w.filename for w in warned if "tokenizer" in str(w.message)} == {__file__}  # names the caller's line
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 1 and (hf_dir / "model.safetensors.index.json").is_file()
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["rope_parameters"]["factor"] == 32.0 and config["dtype"] == "float32"
    tokens = tokens_for(scaled_params["vocab_size"])
    ours, ref = our_logits(ckpt, tokens), hf_logits(hf_dir, tokens)
    assert rel_err(ref, ours) <= 1e-4
    # The factor matters at these positions: with Meta's default of 8 the logits would be far off.
    factor8 = {**scaled_params, "rope_scaling_factor": 8.0}
    (ckpt / "params.json").write_text(json.dumps(factor8))
    assert rel_err(our_logits(ckpt, tokens), ref) > 10 * 1e-4


def test_hf_meta_hf_round_trip(rel_err, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, tie_word_embeddings=True,
                         rope_parameters=rope, max_position_embeddings=131072)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # HF's init (std 0.02) gives near-uniform logits; spread them so errors show
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if param.dim() == 1 else torch.randn_like(param) / param.shape[-1] ** 0.5)
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    tokens = tokens_for(512)
    with torch.no_grad():
        ref = model(tokens).logits

    no_tokenizer = "has no tokenizer.model .* copy a Llama 3 tokenizer.model into it"
    with pytest.warns(UserWarning, match=no_tokenizer) as warned:
        meta = convert_from_hf(tmp_path / "hf", tmp_path / "meta", model_parallel_size=2)
    assert {w.filename for w in warned if "tokenizer" in str(w.message)} == {__file__}  # names the caller's line
    params = read_params(meta)
    assert params["rope_scaling_factor"] == 32.0 and params["use_scaled_rope"] is True
    assert len(shard_paths(meta)) == 2
    # Tied: output.weight is the embedding, split by vocabulary rows like Meta's (256 of the 512 per shard).
    halves = [load_shard(path)["output.weight"] for path in shard_paths(meta)]
    assert [h.shape for h in halves] == [(256, 128)] * 2
    assert torch.equal(torch.cat(halves), model.model.embed_tokens.weight)
    assert rel_err(our_logits(meta, tokens), ref) <= 1e-4

    with pytest.warns(UserWarning, match="has no tokenizer"):
        again = convert_to_hf(meta, tmp_path / "hf2")
    saved = json.loads((again / "config.json").read_text())
    assert saved["tie_word_embeddings"] is True and saved["intermediate_size"] == 352
    assert rel_err(hf_logits(again, tokens), ref) <= 1e-4


def test_hf_tokenizer_matches_ours(tiny_hf, tokenizer):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_hf, local_files_only=True)
    texts = ["This is a test sentence.", "  héllo\n\n wörld 12345\t", "日本語のテキスト", "it's 3.14159!!  \n",
             "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>", ""]
    for text in texts:
        assert hf.encode(text, add_special_tokens=False) == tokenizer.encode(text, bos=False, eos=False,
                                                                            allowed_special="all"), text
        assert hf.encode(text) == tokenizer.encode(text, bos=True, eos=False, allowed_special="all"), text
    assert hf.decode(tokenizer.encode(texts[1], bos=False, eos=False)) == texts[1]
    assert len(hf) == 128256 and hf.eos_token == "<|end_of_text|>"


def test_hf_config_forms_and_ffn_params():
    old = {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, "tie_word_embeddings": True}
    params = params_from_hf_config(old)
    assert params == {**PRESETS["1B"], "rope_scaling_factor": 32.0}
    new = {**old, "rope_parameters": {**old.pop("rope_scaling"), "rope_theta": 500000.0}}
    del new["rope_theta"]
    assert params_from_hf_config(new) == params
    llama3_8b = {**old, "hidden_size": 4096, "intermediate_size": 14336, "rope_scaling": None}
    assert params_from_hf_config(llama3_8b)["use_scaled_rope"] is False
    # Meta's published values where they fit; otherwise any combination that reproduces the size.
    assert ffn_params_for(4096, 14336) == (1024, 1.3) and ffn_params_for(8192, 28672) == (4096, 1.3)
    assert ffn_params_for(16384, 53248) == (4096, 1.2) and ffn_params_for(3072, 8192) == (256, 1.0)
    for dim, hidden in ((128, 352), (64, 224), (96, 1000), (100, 7), (4096, 11008)):
        multiple_of, mult = ffn_params_for(dim, hidden)
        assert ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=mult).ffn_hidden_dim == hidden
    with pytest.raises(ValueError, match="high_freq_factor = 4.0, got 2.0"):
        params_from_hf_config({**new, "rope_parameters": {**new["rope_parameters"], "high_freq_factor": 2.0}})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        params_from_hf_config({**new, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="head_dim"):
        params_from_hf_config({**new, "head_dim": 128})
    with pytest.raises(ValueError, match="missing required field"):
        params_from_hf_config({"hidden_size": 64})


def test_refuses_non_empty_dst_and_leaves_nothing_on_failure(tiny_checkpoint, tiny_hf, tmp_path):
    from safetensors.torch import load_file, save_file

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_to_hf(tiny_checkpoint(1), taken, tokenizer=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_from_hf(tiny_hf, taken)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    with pytest.raises(FileExistsError, match="keep.txt"):  # --overwrite replaces only an earlier output
        convert_from_hf(tiny_hf, taken, overwrite=True)
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    (taken / "keep.txt").rename(taken / "config.json")  # now it looks like an earlier output
    convert_from_hf(tiny_hf, taken, overwrite=True)
    assert not (taken / "config.json").exists()
    assert (taken / "params.json").is_file() and not (taken / "keep.txt").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((tiny_hf / "config.json").read_bytes())
    tensors = load_file(tiny_hf / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'\]"):
        convert_from_hf(broken, tmp_path / "out")
    # A wrong shape is only found midway through writing: the partial folder is removed.
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(5, 64, dtype=torch.bfloat16)
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight has shape \(5, 64\)"):
        convert_from_hf(broken, tmp_path / "out", model_parallel_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "taken"]


def test_missing_inputs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        convert_from_hf(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "intermediate_size": 224,
                                                      "num_hidden_layers": 1, "num_attention_heads": 4,
                                                      "vocab_size": 32}))
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors files"):
        convert_from_hf(tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="max_shard_size"):
        convert_to_hf(tmp_path, tmp_path / "out", max_shard_size="lots")


def test_cli_help(capsys):
    import fire

    from llama.checkpoint.__main__ import COMMANDS

    done = subprocess.run([sys.executable, "-m", "llama.checkpoint", "to_hf", "--help"], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "max_shard_size" in done.stdout + done.stderr, done.stderr
    # The other command in-process (a second interpreter would only repeat the imports).
    with pytest.raises(fire.core.FireExit) as exited:
        fire.Fire(COMMANDS, command=["from_hf", "--help"])
    captured = capsys.readouterr()
    assert exited.value.code == 0 and "model_parallel_size" in captured.out + captured.err
