"""Hugging Face `LlamaConfig` ⇄ Meta `params.json`: the same architecture described both ways.

No transformers import is needed: these are plain dicts (LlamaConfig's keyword arguments, or a config.json).
"""

import math
from pathlib import Path
from typing import Any, Optional

from llama.args import ROPE_HIGH_FREQ_FACTOR, ROPE_LOW_FREQ_FACTOR, ROPE_ORIGINAL_CONTEXT, ModelArgs

# Meta's published (multiple_of, ffn_dim_multiplier) by (dim, ffn hidden size): 1B, 3B, 8B, 70B, 405B.
_META_FFN_PARAMS = {(2048, 8192): (256, 1.5), (3072, 8192): (256, 1.0), (4096, 14336): (1024, 1.3),
                    (8192, 28672): (4096, 1.3), (16384, 53248): (4096, 1.2)}


def hf_config_dict(args: ModelArgs) -> dict:
    """Keyword arguments for `transformers.LlamaConfig` describing the same architecture (transformers >= 5)."""
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.use_scaled_rope:
        rope.update(rope_type="llama3", factor=args.rope_scaling_factor, low_freq_factor=ROPE_LOW_FREQ_FACTOR,
                    high_freq_factor=ROPE_HIGH_FREQ_FACTOR, original_max_position_embeddings=ROPE_ORIGINAL_CONTEXT)
    return {
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.ffn_hidden_dim,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        # Context the models were released with: 128K for 3.1+ (scaled rope), 8K for 3.0. Only a label
        # for these rope types; HF validates that it exceeds original_max_position_embeddings.
        "max_position_embeddings": 131072 if args.use_scaled_rope else 8192,
        "rms_norm_eps": args.norm_eps,
        "rope_parameters": rope,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
    }


def ffn_params_for(dim: int, hidden: int) -> tuple[int, Optional[float]]:
    """(multiple_of, ffn_dim_multiplier) with which ModelArgs.ffn_hidden_dim is exactly `hidden` for this `dim`.

    Meta's published values are preferred; otherwise the largest power-of-two multiple_of and the shortest
    multiplier that reproduce `hidden`.
    """
    def reproduces(multiple_of: int, multiplier: Optional[float]) -> bool:
        args = ModelArgs(dim=dim, n_layers=1, n_heads=1, vocab_size=1, multiple_of=multiple_of,
                         ffn_dim_multiplier=multiplier)
        return args.ffn_hidden_dim == hidden

    if (dim, hidden) in _META_FFN_PARAMS and reproduces(*_META_FFN_PARAMS[dim, hidden]):
        return _META_FFN_PARAMS[dim, hidden]
    base = int(2 * 4 * dim / 3)  # the hidden size before multiplier and rounding, as in ModelArgs.ffn_hidden_dim
    for multiple_of in (4096, 1024, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if hidden % multiple_of:
            continue
        if reproduces(multiple_of, None):
            return multiple_of, None
        # Round hidden/base to as few decimals as work; the last candidate lands mid-integer, so float error
        # cannot flip int() to the neighbouring value.
        candidates = [round(hidden / base, d) for d in range(1, 8)] + [(hidden + 0.5) / base]
        for multiplier in candidates:
            if multiplier > 0 and reproduces(multiple_of, multiplier):
                return multiple_of, multiplier
    raise ValueError(f"no multiple_of/ffn_dim_multiplier gives an FFN hidden size of {hidden} for dim {dim}")


def _is_positive(value: Any, integer: bool = False) -> bool:
    number = isinstance(value, int) or (not integer and isinstance(value, float) and math.isfinite(value))
    return number and not isinstance(value, bool) and value > 0


# The types LlamaConfig gives the fields read here: (accepts(value), what it must be).
_FIELD_TYPES = {
    **dict.fromkeys(("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"),
                    (lambda v: _is_positive(v, integer=True), "a positive integer")),
    **dict.fromkeys(("num_key_value_heads", "head_dim"),
                    (lambda v: v is None or _is_positive(v, integer=True), "a positive integer or null")),
    **dict.fromkeys(("rms_norm_eps", "rope_theta"), (_is_positive, "a number > 0")),
    # Silently ignoring either of these would convert with the wrong rope.
    **dict.fromkeys(("rope_parameters", "rope_scaling"), (lambda v: v is None or isinstance(v, dict),
                                                          "a JSON object or null")),
    "tie_word_embeddings": (lambda v: isinstance(v, bool), "true or false"),
}


def _check_types(config: dict, path: Path) -> None:
    """Raise ValueError, naming `path` and the field, unless the fields read have the types LlamaConfig gives them."""
    for name, (accepts, what) in _FIELD_TYPES.items():
        if name in config and not accepts(config[name]):
            raise ValueError(f"{path}: {name} must be {what}, got {config[name]!r}")


def _rope_from_hf(config: dict, path: Path) -> dict:
    """params.json's rope fields from an HF config in either the transformers 5 or the older form."""
    if isinstance(config.get("rope_parameters"), dict):  # transformers >= 5
        rope, field = dict(config["rope_parameters"]), "rope_parameters.rope_theta"
    else:  # older: rope_scaling (or null) plus a top-level rope_theta
        rope, field = dict(config.get("rope_scaling") or {}), "rope_theta"
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))  # 10000: LlamaConfig's default
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if not _is_positive(rope.get("rope_theta", 10000.0)):
        raise ValueError(f"{path}: {field} must be a number > 0, got {rope['rope_theta']!r}")
    params: dict = {"rope_theta": float(rope.get("rope_theta", 10000.0))}
    if rope_type == "default":
        params["use_scaled_rope"] = False
        return params
    if rope_type != "llama3":
        raise ValueError(f"{path}: rope type {rope_type!r} is not supported; valid: 'default' or 'llama3'")
    expected = {"low_freq_factor": ROPE_LOW_FREQ_FACTOR, "high_freq_factor": ROPE_HIGH_FREQ_FACTOR,
                "original_max_position_embeddings": ROPE_ORIGINAL_CONTEXT}
    for name, value in expected.items():
        # The model implements Llama 3.1's scaling with these constants only.
        if rope.get(name) != value:
            raise ValueError(f"{path}: llama3 rope scaling needs {name} = {value}, got {rope.get(name)!r}")
    if not isinstance(rope.get("factor"), (int, float)) or not rope["factor"] > 0:
        raise ValueError(f"{path}: llama3 rope scaling needs a positive 'factor', got {rope.get('factor')!r}")
    params["use_scaled_rope"] = True
    if float(rope["factor"]) != 8.0:  # 8 is ModelArgs' (and Meta's) default; others are recorded
        params["rope_scaling_factor"] = float(rope["factor"])
    return params


def params_from_hf_config(config: dict, path: Path = Path("config.json")) -> dict:
    """Meta params.json dict for the architecture an HF Llama `config.json` describes (`path` names it in errors)."""
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, not {type(config).__name__}")
    if config.get("model_type", "llama") != "llama":
        raise ValueError(f"{path}: model_type is {config['model_type']!r}; only 'llama' configs can be converted")
    for name, value in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
        if config.get(name, value) != value:
            raise ValueError(f"{path}: {name} = {config[name]!r} is not supported; Llama 3 uses {value!r}")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in config]
    if missing:
        raise ValueError(f"{path} is missing required field(s) {missing}")
    _check_types(config, path)
    dim, n_heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, dim // n_heads) or dim % n_heads:
        raise ValueError(f"{path}: head_dim ({config.get('head_dim')}) must equal hidden_size / num_attention_heads "
                         f"({dim} / {n_heads}); the Meta layout has no separate head_dim")
    try:
        multiple_of, multiplier = ffn_params_for(dim, config["intermediate_size"])
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    params = {
        "dim": dim, "n_layers": config["num_hidden_layers"], "n_heads": n_heads,
        "n_kv_heads": config.get("num_key_value_heads") or n_heads, "vocab_size": config["vocab_size"],
        "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
        "norm_eps": config.get("rms_norm_eps", 1e-6),  # 1e-6: LlamaConfig's default
        **_rope_from_hf(config, path),
    }
    try:
        ModelArgs.from_params(params)  # fails here, naming the field, if the shape is inconsistent
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return params
