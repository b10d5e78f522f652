"""Run Meta's Llama 3.x models from their original checkpoints."""

from llama.generation import Llama
from llama.model import ModelArgs, Transformer
from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer

__all__ = ["ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "Tokenizer", "Transformer"]
