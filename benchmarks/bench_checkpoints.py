"""The benchmarks' random checkpoints: one per (preset, seed) in Meta's layout, and its conversion to an HF folder,
written once into a cache folder and reused by every later run."""

import json
from pathlib import Path

import torch

from safetensors_writer import write_aligned_safetensors

CHECKPOINT_DTYPE = torch.bfloat16  # how the random checkpoint is stored, whatever dtype a run computes in


def prepare_checkpoints(cache_dir: Path, preset: str, seed: int, with_hf: bool) -> tuple[Path, Path]:
    """The Meta checkpoint and (`with_hf`) its HF conversion for (preset, seed), written on first use, then reused.

    A `complete` marker is written last, so an interrupted run is redone rather than reused half-written.
    """
    from llama.args import ModelArgs
    from llama.checkpoint.hf import meta_to_hf_state_dict
    from llama.checkpoint.hf_config import hf_config_dict
    from llama.checkpoint.load import load_shard, read_params
    from llama.checkpoint.random_weights import write_random_checkpoint

    base = cache_dir / f"{preset}-seed{seed}"
    meta_dir, hf_dir = base / "meta", base / "hf"
    if not (meta_dir / "complete").is_file():
        print(f"writing a random {preset} checkpoint to {meta_dir} ...", flush=True)
        write_random_checkpoint(meta_dir, preset, 1, seed, CHECKPOINT_DTYPE)
        if not (meta_dir / "tokenizer.model").is_file():
            raise RuntimeError("the checkpoint needs the Llama 3 tokenizer from `pip install llama-models`")
        (meta_dir / "complete").touch()
    if with_hf and not (hf_dir / "complete").is_file():
        print(f"converting it to an HF folder in {hf_dir} ...", flush=True)
        hf_dir.mkdir(parents=True, exist_ok=True)
        args = ModelArgs.from_params(read_params(meta_dir))
        config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **hf_config_dict(args)}
        (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        state_dict = meta_to_hf_state_dict(load_shard(meta_dir / "consolidated.00.pth"), args)
        write_aligned_safetensors(state_dict, hf_dir / "model.safetensors")
        del state_dict
        (hf_dir / "complete").touch()
    return meta_dir, hf_dir
