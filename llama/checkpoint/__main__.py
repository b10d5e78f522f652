"""`python -m llama.checkpoint random|reshard|from_hf|to_hf`: write, reshard and convert checkpoints.

Bad input (a missing folder, a wrong shape, a taken destination) exits with a one-line `error: ...`.
"""

import sys
from pathlib import Path

import fire

from llama.checkpoint.hf import convert_from_hf, convert_to_hf
from llama.checkpoint.random_weights import write_random_checkpoint
from llama.checkpoint.reshard import reshard_checkpoint


def random(
    dst: str,
    preset: str = "tiny",
    model_parallel_size: int = 1,
    seed: int = 0,
    dtype: str = "bfloat16",
    overwrite: bool = False,
) -> str:
    """Write a random-weight checkpoint in Meta's layout to DST (preset: tiny, 1B, 3B, 8B or 70B)."""
    return str(write_random_checkpoint(dst, preset, model_parallel_size, seed, dtype, overwrite))


def reshard(src: str, dst: str, model_parallel_size: int, overwrite: bool = False) -> str:
    """Rewrite checkpoint SRC as MODEL_PARALLEL_SIZE shards in DST (a divisor or multiple of its shard count)."""
    return str(reshard_checkpoint(Path(src), Path(dst), model_parallel_size, overwrite))


def from_hf(hf_dir: str, dst: str, model_parallel_size: int = 1, overwrite: bool = False) -> str:
    """Convert the HF Llama folder HF_DIR (config.json + safetensors) to a Meta checkpoint of K shards in DST."""
    return str(convert_from_hf(hf_dir, dst, model_parallel_size, overwrite))


def to_hf(src: str, dst: str, max_shard_size: str = "5GB", overwrite: bool = False) -> str:
    """Convert the Meta checkpoint SRC to an HF LlamaForCausalLM folder DST (config.json, safetensors, tokenizer)."""
    return str(convert_to_hf(src, dst, max_shard_size, overwrite))


# Subcommands of `python -m llama.checkpoint`; add new ones here.
COMMANDS = {"random": random, "reshard": reshard, "from_hf": from_hf, "to_hf": to_hf}

if __name__ == "__main__":
    try:
        fire.Fire(COMMANDS, name="llama.checkpoint")  # not argv[0]: help would name __main__.py
    except (ValueError, FileNotFoundError, FileExistsError) as error:  # bad input: the message says it all
        sys.exit(f"error: {error}")
