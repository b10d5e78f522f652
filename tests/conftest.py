"""Shared fixtures: the real Llama 3 tokenizer file, shipped inside the `llama-models` package."""

from pathlib import Path

import pytest

from llama.tokenizer import ChatFormat, Tokenizer


@pytest.fixture(scope="session")
def tokenizer_path() -> Path:
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert path.is_file(), f"llama-models does not ship {path}"
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def chat_format(tokenizer) -> ChatFormat:
    return ChatFormat(tokenizer)


@pytest.fixture(scope="session")
def meta_tokenizer(tokenizer_path):
    """Meta's own tokenizer from `llama-models`: an independent implementation over the same file."""
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    return MetaTokenizer(tokenizer_path)
