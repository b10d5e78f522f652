"""Run Meta's Llama 3.x models from their original checkpoints."""

from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer

__all__ = ["ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "Tokenizer", "Transformer"]


def __getattr__(name: str):
    # `Llama` is imported on first use: importing llama.generation here would import llama.checkpoint
    # before `python -m llama.checkpoint` runs it, which makes runpy warn.
    if name == "Llama":
        from llama.generation import Llama

        return Llama
    raise AttributeError(f"module 'llama' has no attribute {name!r}")
