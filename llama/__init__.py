"""Run Meta's Llama 3.x models from their original checkpoints."""

from llama.tokenizer import ChatFormat, Dialog, Message, Tokenizer

__all__ = ["ChatFormat", "Dialog", "Message", "Tokenizer"]
