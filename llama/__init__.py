"""Run Meta's Llama 3.x models from their original checkpoints."""

from llama.args import ModelArgs
from llama.chat_format import ChatFormat, Dialog, Message
from llama.generation import Llama
from llama.model import Transformer
from llama.tokenizer import Tokenizer

__all__ = ["ChatFormat", "Dialog", "Llama", "Message", "ModelArgs", "Tokenizer", "Transformer"]
