"""o200k_harmony: token ids equal openai-harmony's (and tiktoken's own o200k_harmony) on a varied corpus,
offline from the shared vocabulary file, with its SHA-256 checked."""
from __future__ import annotations

import os
import shutil

import pytest
import tiktoken

from gptoss_jax import PRESETS
from gptoss_jax import tokenizer as tk
from gptoss_jax.harmony import load_encoding

CORPUS = [
    "Hello, world! I'll say it's HTTPServer's job; they'd've known.",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n\n\n    if x >= 10_000: print(f\"{x!r:>8}\")\n",
    "日本語のテキストを正しく分割できますか？　全角スペースも。カタカナ、ひらがな、漢字。",
    "emoji 🎉🎉 👩‍👩‍👧‍👦 🇯🇵 ❤️‍🔥 and skin tones 👍🏽",
    "whitespace runs:     four\t\ttabs\n\n\n\r\n   \n trailing   ",
    "numbers 1234567890 3.14159 -42 1e-9 0x1F",
    "한국어 텍스트, العربية, हिन्दी, Ελληνικά, русский текст",
    "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant<|channel|>final<|message|>4<|return|>",
    "<|constrain|>json<|call|><|startoftext|><|endoftext|><|reserved_200000|><|reserved_201087|>",
    "almost special: <|start| >, <|nope|>, <|endofprompt|>, <|reserved_200018|>",
    "",
]


@pytest.fixture(scope="module")
def ours(o200k_path):
    return tk.load_tokenizer(o200k_path)


@pytest.fixture(scope="module")
def harmony(o200k_path):
    return load_encoding(o200k_path)


@pytest.fixture
def tiktoken_cache(tmp_path, o200k_path, monkeypatch):
    """A tiktoken cache folder holding the shared vocabulary under tiktoken's own name (no download)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(tk.VOCAB_ENV, raising=False)
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
    shutil.copy(o200k_path, tk.tiktoken_cache_path())
    return tmp_path


@pytest.mark.parametrize("text", CORPUS)
def test_ids_equal_openai_harmony(ours, harmony, text):
    special = ours.encode(text, allowed_special="all")
    assert special == harmony.encode(text, allowed_special="all")
    plain = ours.encode(text, disallowed_special=())
    assert plain == harmony.encode(text, disallowed_special=())
    assert ours.decode(special) == harmony.decode(special) == ours.decode(plain) == text


def test_special_tokens_equal_openai_harmony(ours, harmony):
    names = harmony.special_tokens_set - {"<|reserved_201088|>"}  # harmony's range names one id past the vocab
    names = sorted(names)
    assert sorted(names) == sorted(ours._special_tokens)
    assert harmony.encode("".join(names), allowed_special="all") == [ours._special_tokens[n] for n in names]
    assert ours.n_vocab == PRESETS["gpt-oss-20b"].vocab_size == 201088
    assert [ours.decode([i]) for i in range(199990, 201088)] == [harmony.decode([i]) for i in range(199990, 201088)]
    assert set(tk.STOP_TOKEN_IDS) == set(harmony.stop_tokens_for_assistant_actions())


def test_equals_tiktoken_o200k_harmony(tiktoken_cache, ours):
    """tiktoken's built-in o200k_harmony (read from its cache): same ranks, pattern and ids, but for the
    <|endofprompt|> alias of 200018 that openai-harmony does not have."""
    ref = tiktoken.get_encoding("o200k_harmony")
    assert ref._pat_str == tk.O200K_PATTERN
    assert ref._mergeable_ranks == ours._mergeable_ranks
    assert {n: i for n, i in ref._special_tokens.items() if n != "<|endofprompt|>"} == ours._special_tokens
    for text in CORPUS:
        assert ours.encode(text, disallowed_special=()) == ref.encode(text, disallowed_special=())


def test_tiktoken_cache_route(tiktoken_cache, ours):
    """Without an explicit file the tokenizer finds tiktoken's cache, and tiktoken's own loader (the online
    route, here served from the cache) gives the same encoding."""
    assert tk.find_vocab() == tk.tiktoken_cache_path()
    via_tiktoken = tk._load(None)
    assert via_tiktoken._mergeable_ranks == ours._mergeable_ranks
    assert via_tiktoken.encode(CORPUS[7], allowed_special="all") == ours.encode(CORPUS[7], allowed_special="all")
    harmony = load_encoding()  # openai-harmony gets tiktoken's cached file too (under the name it expects)
    assert harmony.encode(CORPUS[1]) == ours.encode(CORPUS[1])


def test_env_var_and_folder(monkeypatch, o200k_path, ours):
    monkeypatch.setenv(tk.VOCAB_ENV, os.path.dirname(o200k_path))
    assert tk.find_vocab() == os.path.join(os.path.dirname(o200k_path), tk.VOCAB_FILENAME)
    assert tk.load_tokenizer() is ours  # same file -> the cached encoding
    monkeypatch.setenv(tk.VOCAB_ENV, "/nonexistent/vocab")
    with pytest.raises(tk.VocabError, match="GPTOSS_VOCAB.*/nonexistent/vocab"):
        tk.load_tokenizer()


def test_corrupted_vocab_is_rejected(tmp_path, o200k_path):
    data = bytearray(open(o200k_path, "rb").read())
    data[100] ^= 1
    bad = tmp_path / "o200k_base.tiktoken"
    bad.write_bytes(bytes(data))
    with pytest.raises(tk.VocabError, match=f"{bad}: SHA-256 .* not o200k_base"):
        tk.load_tokenizer(bad)
    with pytest.raises(tk.VocabError, match="not found"):
        tk.load_tokenizer(tmp_path / "missing.tiktoken")


def test_text_stream_holds_back_split_characters(ours):
    text = CORPUS[2] + CORPUS[3]
    ids = ours.encode(text)
    stream = tk.TextStream(ours)
    pieces = [stream.push(t) for t in ids] + [stream.flush()]
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    assert any(p == "" for p in pieces)  # some emoji bytes span tokens and were held back


SOURCES = [os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f)
           for f in ("README.md", "gptoss_jax/harmony.py", "gptoss_jax/tokenizer.py")]


@pytest.mark.parametrize("text", CORPUS + [open(p, encoding="utf-8").read() for p in SOURCES]
                         + ["x" * tk.MAX_PIECE_CHARS, " " * tk.MAX_PIECE_CHARS + "y", "ab" * 3000 + " !?" * 2000])
def test_encode_bounded_equals_tiktoken(ours, text):
    """Ordinary text (and runs up to MAX_PIECE_CHARS): the same ids as tiktoken."""
    assert tk.encode_bounded(ours, text) == ours.encode_ordinary(text)


def test_encode_bounded_cuts_only_longer_runs(ours):
    """1M spaces overflow tiktoken's regex stack (a panic); cut into MAX_PIECE_CHARS pieces they do not,
    and the text around the run keeps its ids."""
    run = " " * 1_000_000
    with pytest.raises(BaseException, match="StackOverflow"):
        ours.encode_ordinary("x" + run + "y")
    ids = tk.encode_bounded(ours, "Hello" + run + "world")
    assert ours.decode(ids) == "Hello" + run + "world"
    assert ids[0] == ours.encode_ordinary("Hello")[0] and ids[-1] == ours.encode_ordinary(" world")[-1]
    assert tk.long_piece("a b " + "c" * 600, 512) == 601 and tk.long_piece("a b " * 600, 512) == 0


def test_longest_token_bounds_the_byte_count(ours):
    """The server's early context bound assumes no token is longer than MAX_TOKEN_BYTES bytes."""
    from gptoss_jax.serving.prompts import MAX_TOKEN_BYTES

    assert max(len(ours.decode_single_token_bytes(i)) for i in range(199998)) == MAX_TOKEN_BYTES
