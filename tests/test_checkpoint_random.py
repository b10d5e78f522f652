import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from llama.checkpoint import PRESETS, merge_shards, param_shapes, shard_dim, write_random_checkpoint
from llama.model import ModelArgs, Transformer

REPO = Path(__file__).resolve().parent.parent
META_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope"]
TINY = ModelArgs.from_params(PRESETS["tiny"])


def load_shards(path: Path, k: int) -> list[dict]:
    return [torch.load(path / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(k)]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: write_random_checkpoint(root / f"k{k}", "tiny", model_parallel_size=k, seed=7) for k in (1, 2)}


def test_presets_are_meta_params_json():
    assert set(PRESETS) == {"tiny", "1B", "3B", "8B", "70B"}
    for name, params in PRESETS.items():
        assert list(params) == META_KEYS, name
        assert params["use_scaled_rope"] is True
        ModelArgs.from_params(params)
    assert ModelArgs.from_params(PRESETS["8B"]).ffn_hidden_dim == 14336
    assert ModelArgs.from_params(PRESETS["70B"]).ffn_hidden_dim == 28672


def test_writes_meta_layout(tiny_checkpoints):
    path = tiny_checkpoints[2]
    names = sorted(p.name for p in path.iterdir())
    assert names == ["checklist.chk", "consolidated.00.pth", "consolidated.01.pth", "params.json", "tokenizer.model"]
    assert json.loads((path / "params.json").read_text()) == PRESETS["tiny"]
    installed = Path(str(resources.files("llama_models") / "llama3" / "tokenizer.model"))
    assert (path / "tokenizer.model").read_bytes() == installed.read_bytes()

    full_shapes = param_shapes(ModelArgs.from_params(PRESETS["tiny"]))
    for shard in load_shards(path, 2):
        assert type(shard) is dict and list(shard) == list(full_shapes)
        assert all(t.dtype == torch.bfloat16 for t in shard.values())
    shard0 = load_shards(path, 1)[0]
    assert shard0["layers.0.attention.wq.weight"].shape == (32, 64)  # 4 heads * 16 / 2 shards
    assert shard0["layers.0.attention.wk.weight"].shape == (16, 64)  # 2 kv heads * 16 / 2
    assert shard0["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard0["layers.0.feed_forward.w2.weight"].shape == (64, 112)  # hidden 224 / 2
    assert shard0["tok_embeddings.weight"].shape == (128256 // 2, 64)


def test_same_full_weights_for_any_shard_count(tiny_checkpoints, tmp_path):
    one = merge_shards(load_shards(tiny_checkpoints[1], 1), TINY)
    two = merge_shards(load_shards(tiny_checkpoints[2], 2), TINY)
    four = merge_shards(load_shards(write_random_checkpoint(tmp_path / "k4", "tiny", 4, seed=7), 4), TINY)
    for merged in (two, four):
        assert list(one) == list(merged) and all(torch.equal(one[k], merged[k]) for k in one)
    # A different seed gives different weights.
    other = merge_shards(load_shards(write_random_checkpoint(tmp_path / "s8", "tiny", seed=8), 1), TINY)
    assert not torch.equal(other["layers.0.attention.wq.weight"], one["layers.0.attention.wq.weight"])


def test_shards_split_along_meta_dims(tiny_checkpoints):
    full = load_shards(tiny_checkpoints[1], 1)[0]
    s0, s1 = load_shards(tiny_checkpoints[2], 2)
    assert torch.equal(s1["layers.1.attention.wq.weight"], full["layers.1.attention.wq.weight"][32:])
    assert torch.equal(s0["layers.1.attention.wo.weight"], full["layers.1.attention.wo.weight"][:, :32])
    assert torch.equal(s1["layers.1.attention.wo.weight"], full["layers.1.attention.wo.weight"][:, 32:])
    assert torch.equal(s1["layers.0.feed_forward.w2.weight"], full["layers.0.feed_forward.w2.weight"][:, 112:])
    assert torch.equal(s1["layers.0.feed_forward.w3.weight"], full["layers.0.feed_forward.w3.weight"][112:])
    assert torch.equal(s1["tok_embeddings.weight"], full["tok_embeddings.weight"][128256 // 2 :])
    assert torch.equal(s1["output.weight"], full["output.weight"][128256 // 2 :])
    for key in ("norm.weight", "layers.0.attention_norm.weight", "layers.1.ffn_norm.weight"):
        assert torch.equal(s0[key], full[key]) and torch.equal(s1[key], full[key])
    assert shard_dim("layers.3.feed_forward.w2.weight") == 1 and shard_dim("norm.weight") is None


def test_random_weights_have_useful_scales(tiny_checkpoints):
    full = load_shards(tiny_checkpoints[1], 1)[0]
    norm = full["layers.0.attention_norm.weight"].float()
    assert 0.02 < norm.std() < 0.3 and abs(norm.mean() - 1) < 0.1  # near 1, but not all equal
    wq = full["layers.0.attention.wq.weight"].float()
    assert abs(wq.std() - 64**-0.5) < 0.02
    w2 = full["layers.0.feed_forward.w2.weight"].float()
    assert abs(w2.std() - 224**-0.5) < 0.01


def test_tiny_shard_loads_strictly_into_meta_model(model_parallel, tiny_checkpoints):
    shard = load_shards(tiny_checkpoints[1], 1)[0]
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_params(PRESETS["tiny"], max_seq_len=32, max_batch_size=2))
    model.load_state_dict(shard, strict=True, assign=True)
    tokens = torch.randint(0, 128256, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (2, 10, 128256) and torch.isfinite(logits).all()
    assert logits.std() > 0.3  # a spread, not near-uniform predictions


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown preset '7B'; valid presets: tiny, 1B, 3B, 8B, 70B"):
        write_random_checkpoint(tmp_path, "7B")
    with pytest.raises(ValueError, match="does not divide n_heads"):
        write_random_checkpoint(tmp_path, "tiny", model_parallel_size=8)
    with pytest.raises(ValueError, match="does not divide n_heads"):
        write_random_checkpoint(tmp_path, "tiny", model_parallel_size=3)
    assert not any(tmp_path.iterdir())


def test_more_shards_than_kv_heads_replicate_each_head(tmp_path):
    full = load_shards(write_random_checkpoint(tmp_path / "k1", "tiny", 1, seed=7), 1)[0]
    shards = load_shards(write_random_checkpoint(tmp_path / "k4", "tiny", 4, seed=7), 4)
    for key in ("layers.1.attention.wk.weight", "layers.1.attention.wv.weight"):
        heads = full[key].view(2, 16, 64)  # tiny: 2 kv heads of 16 dims
        # Shards 0 and 1 hold the query heads that use kv head 0; shards 2 and 3 those of kv head 1.
        assert [shard[key].shape for shard in shards] == [(16, 64)] * 4
        for rank, shard in enumerate(shards):
            assert torch.equal(shard[key], heads[rank // 2])
    assert torch.equal(shards[3]["layers.1.attention.wq.weight"], full["layers.1.attention.wq.weight"][48:])


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown Meta state-dict key 'foo'"):
        merge_shards([{"foo": torch.zeros(1)}], TINY)


def test_cli(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "llama.checkpoint", *args], cwd=REPO,
                                       capture_output=True, text=True, timeout=120)
    # fire prints help to stderr when not attached to a terminal.
    top = run("--help")
    assert top.returncode == 0 and "random" in top.stdout + top.stderr
    helped = run("random", "--help")
    assert helped.returncode == 0 and "model_parallel_size" in helped.stdout + helped.stderr
    made = run("random", str(tmp_path / "ck"), "--preset", "tiny", "--model_parallel_size", "2", "--seed", "3")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
