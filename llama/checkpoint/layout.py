"""Meta's checkpoint layout: the full shape of every tensor, and how K `consolidated.NN.pth` shards split them.

Meta splits each weight across model-parallel shards the way fairscale's layers hold them: the embedding and
output over the vocabulary, wq/wk/wv/w1/w3 by output rows (whole heads for attention), wo/w2 by input columns;
the norms are whole on every shard. A checkpoint of K shards runs on any process count W that divides K or that
K divides: each process cuts or joins the pieces it needs.

A checkpoint of GGUF blocks (params.json "quantization": "gguf_blocks", written by `from_gguf`) stores a
block-quantized weight `K` as the tensors of `llama.block_quant`'s form under `K.q4_values`, `K.q4_scales`,
`K.q4_mins` (or `K.q8_values`, `K.q8_scales`), split like `K`: by rows, or by columns at block boundaries only.
Without `output.weight` its output layer is the embedding (tied, stored once).
"""

from collections.abc import Callable, Iterable
from typing import Optional

import torch

from llama.args import ModelArgs
from llama.block_quant import BLOCK, Blocks, Q4Blocks, Q8Blocks

# The dimension each tensor is split along (None: every shard holds it whole) and the whole units it is split
# into, as (number of units, rows or columns per unit), keyed by the last two components of its key.
_SPLITS = {
    "tok_embeddings.weight": (0, lambda a: (a.vocab_size, 1)),
    "output.weight": (0, lambda a: (a.vocab_size, 1)),
    "wq.weight": (0, lambda a: (a.n_heads, a.head_dim)),
    "wk.weight": (0, lambda a: (a.n_kv_heads, a.head_dim)),
    "wv.weight": (0, lambda a: (a.n_kv_heads, a.head_dim)),
    "wo.weight": (1, lambda a: (a.n_heads, a.head_dim)),
    "w1.weight": (0, lambda a: (a.ffn_hidden_dim, 1)),
    "w3.weight": (0, lambda a: (a.ffn_hidden_dim, 1)),
    "w2.weight": (1, lambda a: (a.ffn_hidden_dim, 1)),
    "attention_norm.weight": (None, None),
    "ffn_norm.weight": (None, None),
    "norm.weight": (None, None),
}


def param_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """Full (unsharded) shape of every tensor of a Meta checkpoint, in state-dict order."""
    q_out, kv_out, hidden = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (q_out, args.dim)
        shapes[p + "attention.wk.weight"] = (kv_out, args.dim)
        shapes[p + "attention.wv.weight"] = (kv_out, args.dim)
        shapes[p + "attention.wo.weight"] = (args.dim, q_out)
        shapes[p + "feed_forward.w1.weight"] = (hidden, args.dim)
        shapes[p + "feed_forward.w2.weight"] = (args.dim, hidden)
        shapes[p + "feed_forward.w3.weight"] = (hidden, args.dim)
        shapes[p + "attention_norm.weight"] = (args.dim,)
        shapes[p + "ffn_norm.weight"] = (args.dim,)
    shapes["norm.weight"] = (args.dim,)
    shapes["output.weight"] = (args.vocab_size, args.dim)
    return shapes


def check_model_parallel_size(args: ModelArgs, model_parallel_size: int) -> None:
    """Raise ValueError unless the model splits evenly into `model_parallel_size` shards.

    With more shards than kv heads, each kv head is replicated on model_parallel_size / n_kv_heads neighbouring
    shards (the ones whose query heads use it), so that ratio must be a whole number.
    """
    mp = model_parallel_size
    if isinstance(mp, bool) or not isinstance(mp, int) or mp <= 0:
        raise ValueError(f"model_parallel_size must be a positive integer, got {mp!r}")
    for name, size in (("n_heads", args.n_heads), ("ffn hidden dim", args.ffn_hidden_dim),
                       ("vocab_size", args.vocab_size)):
        if size % mp != 0:
            raise ValueError(f"model_parallel_size {mp} does not divide {name} ({size}); "
                             "it must divide n_heads, the ffn hidden dim and vocab_size")
    if args.n_kv_heads % mp != 0 and mp % args.n_kv_heads != 0:
        raise ValueError(f"model_parallel_size {mp} and n_kv_heads ({args.n_kv_heads}) must divide one another")


def n_local_kv_heads(args: ModelArgs, model_parallel_size: int) -> int:
    """kv heads held by each of `model_parallel_size` shards: one replicated head when they outnumber the heads."""
    return max(1, args.n_kv_heads // model_parallel_size)


def valid_world_sizes(args: ModelArgs, n_shards: int) -> list[int]:
    """Process counts that can run a checkpoint of `n_shards` shards: divisors or multiples of it that fit the model."""

    def fits(world_size: int) -> bool:
        try:
            check_model_parallel_size(args, world_size)
        except ValueError:
            return False
        return n_shards % world_size == 0 or world_size % n_shards == 0

    return [w for w in range(1, args.n_heads + 1) if fits(w)]


def _split(key: str) -> tuple:
    suffix = ".".join(key.split(".")[-2:])
    if suffix not in _SPLITS:
        raise ValueError(f"unknown Meta state-dict key {key!r}; expected keys ending in one of {sorted(_SPLITS)}")
    return _SPLITS[suffix]


def shard_dim(key: str) -> Optional[int]:
    """Dimension along which Meta splits the tensor `key` across shards, or None if every shard has it whole."""
    return _split(key)[0]


def shard_range(key: str, args: ModelArgs, part: int, parts: int) -> tuple[int, int]:
    """Rows (or columns) [start, end) of the full tensor `key` that shard `part` of `parts` holds along its shard dim.

    With more shards than kv heads, each kv head is replicated on parts / n_kv_heads neighbouring shards.
    """
    n_units, unit = _split(key)[1](args)
    if parts <= n_units:
        first, count = part * (n_units // parts), n_units // parts
    else:
        first, count = part * n_units // parts, 1
    return first * unit, (first + count) * unit


def _stored_range(stored: str, dim: int, start: int, end: int) -> tuple[int, int]:
    """The range of the stored tensor `stored` (a weight or one of its block tensors) that holds weight rows (dim 0)
    or columns (dim 1) [start, end); columns of blocks are cut at block boundaries only."""
    suffix = stored.rpartition(".")[2]
    if dim == 0 or suffix not in _BLOCK_TENSORS:
        return start, end
    if start % BLOCK or end % BLOCK:
        raise ValueError(f"{stored.rpartition('.')[0]} is stored in blocks of {BLOCK} columns and cannot be split at "
                         f"column {start if start % BLOCK else end}; use a process count that splits it at block "
                         "boundaries, or import the GGUF file with --dequantize")
    per_block = _BLOCK_TENSORS[suffix][1]
    return start // BLOCK * per_block, end // BLOCK * per_block


def take_shard(full: torch.Tensor, key: str, args: ModelArgs, part: int, parts: int,
               stored: Optional[str] = None) -> torch.Tensor:
    """Shard `part` of `parts` of the full tensor `key` (a view); `stored`: the block tensor of `key` it is."""
    dim = shard_dim(key)
    if dim is None:
        return full
    start, end = _stored_range(stored or key, dim, *shard_range(key, args, part, parts))
    return full.narrow(dim, start, end - start)


def gather_shard(
    read_shard: Callable[[int], dict[str, torch.Tensor]], n_shards: int, key: str, args: ModelArgs, part: int,
    parts: int, stored: Optional[str] = None,
) -> torch.Tensor:
    """Shard `part` of `parts` of tensor `key` (or of its block tensor `stored`), cut and joined from a checkpoint
    of `n_shards` shards.

    `read_shard(m)` returns shard m's state dict; only the shards that hold a piece are asked for.
    """
    stored = stored or key
    dim = shard_dim(key)
    if dim is None:
        return read_shard(0)[stored]
    start, end = shard_range(key, args, part, parts)
    pieces, pos = [], start
    for m in range(n_shards):
        m_start, m_end = shard_range(key, args, m, n_shards)
        if m_start <= pos < m_end:  # the first shard holding the next rows; its replicas are skipped
            take = min(m_end, end) - pos
            first, last = _stored_range(stored, dim, pos - m_start, pos - m_start + take)
            pieces.append(read_shard(m)[stored].narrow(dim, first, last - first))
            pos += take
            if pos == end:
                break
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)


# The tensors of a block-quantized weight: suffix -> (dtype, stored columns per block of BLOCK weight columns).
_BLOCK_TENSORS = {"q4_values": (torch.uint8, BLOCK // 2), "q4_scales": (torch.float16, 1),
                  "q4_mins": (torch.float16, 1), "q8_values": (torch.int8, BLOCK), "q8_scales": (torch.float16, 1)}
BLOCK_KINDS = {"q4": ("values", "scales", "mins"), "q8": ("values", "scales")}


def block_state(key: str, blocks: Blocks) -> dict[str, torch.Tensor]:
    """The checkpoint tensors that store the weight `key` as `blocks`."""
    kind = "q4" if isinstance(blocks, Q4Blocks) else "q8"
    return {f"{key}.{kind}_{part}": getattr(blocks, part) for part in BLOCK_KINDS[kind]}


def stored_keys(key: str, kind: str) -> list[str]:
    """The checkpoint tensors that store the weight `key` as `kind` ("float", "q4" or "q8")."""
    return [key] if kind == "float" else [f"{key}.{kind}_{part}" for part in BLOCK_KINDS[kind]]


def stored_kind(keys: Iterable[str], key: str) -> Optional[str]:
    """How the weight `key` is stored among `keys`: "float" (as itself), "q4", "q8", or None (absent)."""
    keys = set(keys)
    if key in keys:
        return "float"
    return next((kind for kind in BLOCK_KINDS if f"{key}.{kind}_values" in keys), None)


def blocks_of(tensors: Callable[[str], torch.Tensor], key: str, kind: str) -> Blocks:
    """The weight `key` stored as `kind` ("q4" or "q8"), its block tensors read with `tensors(stored key)`."""
    parts = [tensors(f"{key}.{kind}_{part}") for part in BLOCK_KINDS[kind]]
    return Q4Blocks(*parts) if kind == "q4" else Q8Blocks(*parts)


def stored_tensors(args: ModelArgs,
                   keys: Iterable[str]) -> dict[str, tuple[str, tuple[int, ...], Optional[torch.dtype]]]:
    """What a shard with the tensor names `keys` must hold: stored key -> (weight key, full shape, dtype, None for
    any floating-point dtype). Meta's layout stores every weight as itself; a checkpoint of GGUF blocks each as
    itself or as blocks, and `output.weight` not at all when it is tied to the embedding."""
    keys = set(keys)
    expected = {}
    for key, shape in param_shapes(args).items():
        kind = stored_kind(keys, key) if args.quantization is not None else "float"
        if kind is None and key == "output.weight":  # tied: the embedding's tensors serve
            continue
        if kind in BLOCK_KINDS and len(shape) == 2 and shape[1] % BLOCK == 0:
            for part in BLOCK_KINDS[kind]:
                dtype, per_block = _BLOCK_TENSORS[f"{kind}_{part}"]
                expected[f"{key}.{kind}_{part}"] = (key, (shape[0], shape[1] // BLOCK * per_block), dtype)
        else:
            expected[key] = (key, shape, None)
    return expected
