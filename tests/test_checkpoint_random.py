import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch

from llama.args import PRESETS, ModelArgs
from llama.checkpoint.layout import shard_dim, take_shard
from llama.checkpoint.load import load_model
from llama.checkpoint.random_weights import write_random_checkpoint

REPO = Path(__file__).resolve().parent.parent
META_KEYS = ["dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "ffn_dim_multiplier",
             "norm_eps", "rope_theta", "use_scaled_rope"]
VOCAB = 128256


def tiny_shapes() -> dict[str, tuple[int, ...]]:
    """The full shapes of the `tiny` preset in Meta's state-dict order, written out by hand: dim 64, 4 heads of 16,
    2 kv heads, ffn hidden 224 (int(2 * 4 * 64 / 3) = 170, * 1.3 = 221, rounded up to a multiple of 32)."""
    shapes = {"tok_embeddings.weight": (VOCAB, 64)}
    for i in range(2):
        shapes.update({
            f"layers.{i}.attention.wq.weight": (64, 64), f"layers.{i}.attention.wk.weight": (32, 64),
            f"layers.{i}.attention.wv.weight": (32, 64), f"layers.{i}.attention.wo.weight": (64, 64),
            f"layers.{i}.feed_forward.w1.weight": (224, 64), f"layers.{i}.feed_forward.w2.weight": (64, 224),
            f"layers.{i}.feed_forward.w3.weight": (224, 64),
            f"layers.{i}.attention_norm.weight": (64,), f"layers.{i}.ffn_norm.weight": (64,),
        })
    return {**shapes, "norm.weight": (64,), "output.weight": (VOCAB, 64)}


def literal_shard(full: torch.Tensor, key: str, rank: int, k: int) -> torch.Tensor:
    """Rank `rank`'s piece of the full tiny tensor `key` among `k` shards, by Meta's rules spelt out for `tiny`."""
    if full.dim() == 1:  # norms: whole on every shard
        return full
    dim = 1 if key.endswith(("wo.weight", "w2.weight")) else 0  # wo and w2 by input columns, the rest by rows
    if key.endswith(("wk.weight", "wv.weight")) and k > 2:
        return full.chunk(2)[rank * 2 // k]  # 2 kv heads: each on the k/2 shards whose query heads use it
    return full.chunk(k, dim)[rank]


def load_shards(path: Path, k: int) -> list[dict]:
    return [torch.load(path / f"consolidated.{r:02d}.pth", weights_only=True) for r in range(k)]


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {k: write_random_checkpoint(root / f"k{k}", "tiny", model_parallel_size=k, seed=7) for k in (1, 2, 4)}


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

    (full,) = load_shards(tiny_checkpoints[1], 1)
    assert type(full) is dict and {k: tuple(t.shape) for k, t in full.items()} == tiny_shapes()
    assert list(full) == list(tiny_shapes())  # Meta's order
    for shard in load_shards(path, 2):
        assert type(shard) is dict and list(shard) == list(tiny_shapes())
        assert all(t.dtype == torch.bfloat16 for t in shard.values())
    shard0 = load_shards(path, 1)[0]
    assert shard0["layers.0.attention.wq.weight"].shape == (32, 64)  # 4 heads * 16 / 2 shards
    assert shard0["layers.0.attention.wk.weight"].shape == (16, 64)  # 2 kv heads * 16 / 2
    assert shard0["layers.0.attention.wo.weight"].shape == (64, 32)
    assert shard0["layers.0.feed_forward.w2.weight"].shape == (64, 112)  # hidden 224 / 2
    assert shard0["tok_embeddings.weight"].shape == (VOCAB // 2, 64)


def test_shards_are_slices_of_the_same_full_weights(tiny_checkpoints):
    (full,) = load_shards(tiny_checkpoints[1], 1)
    for k in (2, 4):
        for rank, shard in enumerate(load_shards(tiny_checkpoints[k], k)):
            assert list(shard) == list(full)
            for key, tensor in shard.items():
                assert torch.equal(tensor, literal_shard(full[key], key, rank, k)), (k, rank, key)


def test_seed_sets_the_weights(tiny_checkpoints, tmp_path):
    (seven,) = load_shards(tiny_checkpoints[1], 1)
    (again,) = load_shards(write_random_checkpoint(tmp_path / "s7", "tiny", seed=7), 1)
    (eight,) = load_shards(write_random_checkpoint(tmp_path / "s8", "tiny", seed=8), 1)
    assert all(torch.equal(seven[k], again[k]) for k in seven)
    assert not any(torch.equal(seven[k], eight[k]) for k in seven)


def test_shards_split_along_meta_dims(tiny_checkpoints):
    full = load_shards(tiny_checkpoints[1], 1)[0]
    s0, s1 = load_shards(tiny_checkpoints[2], 2)
    assert torch.equal(s1["layers.1.attention.wq.weight"], full["layers.1.attention.wq.weight"][32:])
    assert torch.equal(s0["layers.1.attention.wo.weight"], full["layers.1.attention.wo.weight"][:, :32])
    assert torch.equal(s1["layers.1.attention.wo.weight"], full["layers.1.attention.wo.weight"][:, 32:])
    assert torch.equal(s1["layers.0.feed_forward.w2.weight"], full["layers.0.feed_forward.w2.weight"][:, 112:])
    assert torch.equal(s1["layers.0.feed_forward.w3.weight"], full["layers.0.feed_forward.w3.weight"][112:])
    assert torch.equal(s1["tok_embeddings.weight"], full["tok_embeddings.weight"][VOCAB // 2 :])
    assert torch.equal(s1["output.weight"], full["output.weight"][VOCAB // 2 :])
    for key in ("norm.weight", "layers.0.attention_norm.weight", "layers.1.ffn_norm.weight"):
        assert torch.equal(s0[key], full[key]) and torch.equal(s1[key], full[key])
    assert shard_dim("layers.3.feed_forward.w2.weight") == 1 and shard_dim("norm.weight") is None


def test_shard_files_hold_only_their_own_elements(tiny_checkpoints):
    # A view saved with torch.save would carry its whole base tensor: the 2-shard files must be about half the size.
    one = (tiny_checkpoints[1] / "consolidated.00.pth").stat().st_size
    two = [(tiny_checkpoints[2] / f"consolidated.{r:02d}.pth").stat().st_size for r in range(2)]
    assert all(0.45 * one < size < 0.6 * one for size in two)


def test_random_weights_have_useful_scales(tiny_checkpoints):
    full = load_shards(tiny_checkpoints[1], 1)[0]
    norm = full["layers.0.attention_norm.weight"].float()
    assert 0.02 < norm.std() < 0.3 and abs(norm.mean() - 1) < 0.1  # near 1, but not all equal
    wq = full["layers.0.attention.wq.weight"].float()
    assert abs(wq.std() - 64**-0.5) < 0.02
    w2 = full["layers.0.feed_forward.w2.weight"].float()
    assert abs(w2.std() - 224**-0.5) < 0.01


def test_tiny_checkpoint_loads_strictly_and_gives_spread_logits(tiny_checkpoints):
    args = ModelArgs.from_params(PRESETS["tiny"], max_seq_len=32, max_batch_size=2)
    model = load_model(tiny_checkpoints[1], args, 0, 1, torch.device("cpu"), torch.bfloat16)
    (full,) = load_shards(tiny_checkpoints[1], 1)
    # The model stacks Meta's wq/wk/wv and w1/w3 by rows; its tensors are the file's, unchanged.
    layer = model.layers[1]
    assert torch.equal(layer.attention.wqkv.weight, torch.cat([full[f"layers.1.attention.{w}.weight"]
                                                               for w in ("wq", "wk", "wv")]))
    assert torch.equal(layer.feed_forward.w13.weight, torch.cat([full["layers.1.feed_forward.w1.weight"],
                                                                 full["layers.1.feed_forward.w3.weight"]]))
    assert torch.equal(model.output.weight, full["output.weight"])
    tokens = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    assert logits.shape == (2, 10, VOCAB) and torch.isfinite(logits).all()
    assert logits.std() > 0.3  # a spread, not near-uniform predictions


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown preset '7B'; valid presets: tiny, 1B, 3B, 8B, 70B"):
        write_random_checkpoint(tmp_path, "7B")
    with pytest.raises(ValueError, match="does not divide n_heads"):
        write_random_checkpoint(tmp_path, "tiny", model_parallel_size=8)
    with pytest.raises(ValueError, match="does not divide n_heads"):
        write_random_checkpoint(tmp_path, "tiny", model_parallel_size=3)
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
        write_random_checkpoint(tmp_path, "tiny", dtype="int8")
    assert not any(tmp_path.iterdir())


def test_more_shards_than_kv_heads_replicate_each_head(tiny_checkpoints):
    full = load_shards(tiny_checkpoints[1], 1)[0]
    shards = load_shards(tiny_checkpoints[4], 4)
    for key in ("layers.1.attention.wk.weight", "layers.1.attention.wv.weight"):
        heads = full[key].view(2, 16, 64)  # tiny: 2 kv heads of 16 dims
        # Shards 0 and 1 hold the query heads that use kv head 0; shards 2 and 3 those of kv head 1.
        assert [shard[key].shape for shard in shards] == [(16, 64)] * 4
        for rank, shard in enumerate(shards):
            assert torch.equal(shard[key], heads[rank // 2])
    assert torch.equal(shards[3]["layers.1.attention.wq.weight"], full["layers.1.attention.wq.weight"][48:])


def test_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown Meta state-dict key 'foo'"):
        take_shard(torch.zeros(4, 4), "foo", ModelArgs.from_params(PRESETS["tiny"]), 0, 2)


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
    assert "Warning" not in made.stderr, made.stderr  # runpy warns if the package imported __main__ early
    assert sorted(p.name for p in (tmp_path / "ck").glob("*.pth")) == ["consolidated.00.pth", "consolidated.01.pth"]
    refused = run("random", str(tmp_path / "ck"), "--preset", "tiny")
    assert refused.returncode == 1 and refused.stderr.strip().startswith("error: ") and "--overwrite" in refused.stderr
    assert "Traceback" not in refused.stderr
