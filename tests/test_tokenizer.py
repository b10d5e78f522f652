"""The tokenizer reproduces Meta's Llama 3 token ids, checked against published ids and independent encoders."""

import base64
import hashlib
import random
from pathlib import Path

import pytest
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llama.tokenizer import Tokenizer

# Written out here from the issue (not imported) so the one-piece reference encoder below is independent.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

SAMPLES = [
    "Hello, world!",
    "Grüße aus Köln — ça va? ¿Qué tal? Dziękuję.",
    "日本語のテキストと中文文本，还有한국어 문장입니다。",
    "Привет, мир! Ελληνικά και עברית ו-العربية मराठी ภาษาไทย",
    "emoji 👩‍👩‍👧‍👦🇫🇷🏳️‍🌈 and 🤖🦙 with skin tone 👍🏽",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\r\n\n    pass\n",
    "   ",
    "\n\n\n",
    "\t \r\n \u00a0\u3000 ",
    "",
    "1234567890 3.14159 -42 1e-5 0x1F",
    "it's they're we've I'm you'll he'd IT'S",
    "<|begin_of_text|> <|eot_id|> <|not_a_token|>",
]


@pytest.fixture(scope="module")
def one_piece_encoder(tokenizer_path) -> tiktoken.Encoding:
    """tiktoken on the raw ranks with Llama 3's pattern, encoding any text in a single call."""
    ranks = {}
    for line in Path(tokenizer_path).read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding("reference", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={})


def test_published_ids_and_decoding(tokenizer):
    ids = tokenizer.encode("This is a test sentence.", bos=True, eos=True)
    assert ids == [128000, 2028, 374, 264, 1296, 11914, 13, 128001]
    assert tokenizer.decode(ids) == "<|begin_of_text|>This is a test sentence.<|end_of_text|>"
    assert tokenizer.encode("Hello, world!", bos=False, eos=False) == [9906, 11, 1917, 0]


def test_special_tokens_have_llama31_names_and_ids(tokenizer):
    assert tokenizer.n_words == 128256
    expected = {
        128000: "<|begin_of_text|>",
        128001: "<|end_of_text|>",
        128002: "<|reserved_special_token_0|>",
        128003: "<|reserved_special_token_1|>",
        128004: "<|finetune_right_pad_id|>",
        128005: "<|step_id|>",
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: "<|eot_id|>",
        128010: "<|python_tag|>",
        128011: "<|image|>",
    }
    expected.update({128012 + i: f"<|reserved_special_token_{2 + i}|>" for i in range(244)})
    assert {i: name for name, i in tokenizer.special_tokens.items()} == expected
    for token_id, name in expected.items():
        assert tokenizer.decode([token_id]) == name
        assert tokenizer.encode(name, bos=False, eos=False, allowed_special="all") == [token_id]
    assert tokenizer.stop_tokens == {128001, 128008, 128009}
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.eot_id, tokenizer.eom_id) == (128000, 128001, 128009, 128008)


def test_special_looking_text_is_plain_unless_allowed(tokenizer):
    text = "<|eot_id|>hi"
    assert tokenizer.encode(text, bos=False, eos=False) == [27, 91, 68, 354, 851, 91, 29, 6151]
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special="all") == [128009, 6151]
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special={"<|eot_id|>"}) == [128009, 6151]
    # Allowing one token leaves the others as text.
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special={"<|eom_id|>"}) == [
        27, 91, 68, 354, 851, 91, 29, 6151,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="eot_id"):
        tokenizer.encode(text, bos=False, eos=False, disallowed_special="all")
    with pytest.raises(ValueError, match="eot_id"):
        tokenizer.encode(text, bos=False, eos=False, disallowed_special={"<|eot_id|>"})
    # A token that is allowed is not disallowed by "all".
    assert tokenizer.encode(text, bos=False, eos=False, allowed_special="all", disallowed_special="all") == [
        128009,
        6151,
    ]


def test_bad_arguments_raise_value_error(tokenizer):
    with pytest.raises(ValueError, match="unknown special tokens"):
        tokenizer.encode("x", bos=False, eos=False, allowed_special={"<|nope|>"})
    with pytest.raises(ValueError, match="allowed_special"):
        tokenizer.encode("x", bos=False, eos=False, allowed_special="<|eot_id|>")
    with pytest.raises(ValueError, match="str"):
        tokenizer.encode(b"bytes", bos=False, eos=False)
    with pytest.raises(ValueError, match="128256"):
        tokenizer.decode([1, 128256])
    with pytest.raises(ValueError, match="128256"):
        tokenizer.decode([-1])


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=False)) == text


def _random_text(rng: random.Random, length: int) -> str:
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789")
        + list(" \t\n\r\n  ")
        + list(".,;:!?'\"()[]{}<>|/\\-_=+*&^%$#@~`")
        + list("éüßøçñ中文日本語한국어русскийΕλληνικάעבריתالعربية")
        + ["🦙", "👍🏽", "\u200d", "\u00a0", "'s", "'ll", "<|eot_id|>", "<|start_header_id|>"]
    )
    return "".join(rng.choice(alphabet) for _ in range(length))


def test_matches_meta_tokenizer_on_generated_strings(tokenizer, meta_tokenizer):
    rng = random.Random(0)
    for i in range(300):
        text = _random_text(rng, rng.randint(0, 200))
        for allowed in (set(), "all"):
            ours = tokenizer.encode(text, bos=True, eos=i % 2 == 0, allowed_special=allowed)
            theirs = meta_tokenizer.encode(text, bos=True, eos=i % 2 == 0, allowed_special=allowed)
            assert ours == theirs, text
        assert tokenizer.decode(ours) == meta_tokenizer.decode(ours)


def test_long_ordinary_text_equals_one_piece_encoding(tokenizer, one_piece_encoder):
    # ~600,000 characters, more than a 128k-token context, with every kind of run but none over 25,000.
    rng = random.Random(1)
    paragraphs = [_random_text(rng, 300) for _ in range(200)] + SAMPLES
    text = "".join(rng.choice(paragraphs) + rng.choice([" ", "\n", "\n\n", "  "]) for _ in range(2400))
    text += " " * 20_000 + "x" * 24_000 + "\n" * 25_000
    assert len(text) > 500_000
    assert tokenizer.encode(text, bos=False, eos=False) == one_piece_encoder.encode_ordinary(text)


@pytest.mark.parametrize("run", ["a", " ", "\n", ".", "7", "ab", "中", " \t"])
def test_huge_runs_encode_and_round_trip(tokenizer, run):
    text = "start " + run * (2_000_000 // len(run)) + " end"
    ids = tokenizer.encode(text, bos=False, eos=False)  # unchunked, tiktoken would crash on long whitespace runs
    assert tokenizer.decode(ids) == text


def test_a_million_as(tokenizer):
    assert len(tokenizer.encode("a" * 1_000_000, bos=False, eos=False)) == 125_000


def test_accepts_str_and_path(tokenizer_path):
    assert Tokenizer(str(tokenizer_path)).n_words == Tokenizer(Path(tokenizer_path)).n_words == 128256


def test_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.model"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Tokenizer(missing)


@pytest.mark.parametrize(
    "content",
    [b'{"model": {"type": "BPE"}}', b"\x80\x02}q\x00.", b"", b"IQ== 0\nIg== one\n", b"IQ== 0\nIg== 0\n"],
    ids=["json", "pickle", "empty", "bad-rank", "duplicate-rank"],
)
def test_non_ranks_file_is_a_value_error(tmp_path, content):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a tiktoken BPE ranks file"):
        Tokenizer(path)


def _write_ranks(path: Path, tokens: list[bytes]) -> None:
    path.write_bytes(b"".join(base64.b64encode(t) + b" %d\n" % i for i, t in enumerate(tokens)))


def test_reads_the_file_now_not_tiktokens_cached_copy(tmp_path, monkeypatch):
    byte_tokens = [bytes([b]) for b in range(256)]
    path = tmp_path / "tokenizer.model"
    _write_ranks(path, byte_tokens + [b"ab"])
    # Put the first file in tiktoken's cache, keyed by the path string as tiktoken does.
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    cache.mkdir()
    (cache / hashlib.sha1(str(path).encode()).hexdigest()).write_bytes(path.read_bytes())
    first = Tokenizer(path)
    assert first.encode("ab", bos=False, eos=False) == [256]

    _write_ranks(path, byte_tokens + [b"cd"])
    # tiktoken's own loader would hand back the stale cached ranks here.
    assert b"ab" in load_tiktoken_bpe(str(path))
    second = Tokenizer(path)
    assert second.encode("ab", bos=False, eos=False) == [97, 98]
    assert second.encode("cd", bos=False, eos=False) == [256]
    # Special ids follow however many ranks the file holds.
    assert second.bos_id == 257 and second.n_words == 257 + 256
