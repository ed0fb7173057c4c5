"""The o200k_harmony tokenizer: tiktoken's o200k_base ranks plus the harmony special tokens.

Where the vocabulary comes from, first match wins (:func:`find_vocab`):

1. the ``vocab`` argument: an ``o200k_base.tiktoken`` file, or a folder holding one;
2. ``$GPTOSS_VOCAB`` (file or folder);
3. ``$TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken`` (openai-harmony's convention);
4. tiktoken's cache: ``$TIKTOKEN_CACHE_DIR`` (else ``$DATA_GYM_CACHE_DIR``, else
   ``$TMPDIR/data-gym-cache``) / sha1(url);
5. ``shared/data/o200k_base.tiktoken`` beside the source checkout (the offline development machines
   keep the vocabulary there);
6. otherwise tiktoken's normal download (needs internet).

A local file is always checked against the published SHA-256.
"""
from __future__ import annotations

import base64
import codecs
import functools
import hashlib
import os
import tempfile

import regex
import tiktoken

O200K_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_FILENAME = "o200k_base.tiktoken"
VOCAB_ENV = "GPTOSS_VOCAB"
N_VOCAB = 201088

# o200k_base's pre-tokenizer (tiktoken_ext/openai_public.py); the tests check it against tiktoken's own.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# harmony special tokens (fact sheet section 5.1); every other id in 200013..201087 is <|reserved_N|>
RETURN, CONSTRAIN, CHANNEL, START, END, MESSAGE, CALL = 200002, 200003, 200005, 200006, 200007, 200008, 200012
HARMONY_SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998, "<|endoftext|>": 199999, "<|reserved_200000|>": 200000,
    "<|reserved_200001|>": 200001, "<|return|>": RETURN, "<|constrain|>": CONSTRAIN,
    "<|reserved_200004|>": 200004, "<|channel|>": CHANNEL, "<|start|>": START, "<|end|>": END,
    "<|message|>": MESSAGE, "<|reserved_200009|>": 200009, "<|reserved_200010|>": 200010,
    "<|reserved_200011|>": 200011, "<|call|>": CALL,
} | {f"<|reserved_{i}|>": i for i in range(200013, N_VOCAB)}
# As in openai-harmony, 200018 is only <|reserved_200018|>: tiktoken's o200k_harmony (and gpt_oss/tokenizer.py)
# also keep o200k_base's alias <|endofprompt|> for it, so the text "<|endofprompt|>" encodes as plain text here.
#: generation stops on these (openai-harmony ``stop_tokens_for_assistant_actions``)
STOP_TOKEN_IDS = (RETURN, CALL)


class VocabError(ValueError):
    """The vocabulary file is missing or is not o200k_base."""


def _as_file(path: str) -> str:
    return os.path.join(path, VOCAB_FILENAME) if os.path.isdir(path) else path


def tiktoken_cache_path() -> str | None:
    """Where tiktoken caches the o200k_base download (None when caching is disabled)."""
    cache_dir = os.environ.get("TIKTOKEN_CACHE_DIR", os.environ.get("DATA_GYM_CACHE_DIR"))
    if cache_dir is None:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    if cache_dir == "":
        return None
    return os.path.join(cache_dir, hashlib.sha1(O200K_URL.encode()).hexdigest())


def find_vocab(vocab: str | os.PathLike | None = None) -> str | None:
    """The local o200k_base file to use, or None (then tiktoken downloads it).

    An explicit ``vocab`` or ``$GPTOSS_VOCAB`` must exist; the other places are only looked at.
    """
    for given, source in ((vocab, "vocab"), (os.environ.get(VOCAB_ENV), f"${VOCAB_ENV}")):
        if given:
            path = _as_file(os.fspath(given))
            if not os.path.isfile(path):
                raise VocabError(f"{source}: {path} not found (expected the {VOCAB_FILENAME} file or its folder)")
            return path
    checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [tiktoken_cache_path(), os.path.join(os.path.dirname(checkout), "shared", "data", VOCAB_FILENAME)]
    if os.environ.get("TIKTOKEN_ENCODINGS_BASE"):
        candidates.insert(0, os.path.join(os.environ["TIKTOKEN_ENCODINGS_BASE"], VOCAB_FILENAME))
    return next((p for p in candidates if p and os.path.isfile(p)), None)


def read_vocab(path: str) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64(token) rank`` per line) after checking its SHA-256."""
    with open(path, "rb") as f:
        data = f.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != O200K_SHA256:
        raise VocabError(f"{path}: SHA-256 {digest} is not o200k_base's {O200K_SHA256} (wrong or corrupted file)")
    ranks = {}
    for line in data.splitlines():  # well-formed: the digest matched
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def _load(path: str | None) -> tiktoken.Encoding:
    if path is None:
        try:
            base = tiktoken.get_encoding("o200k_base")  # tiktoken's own cache or download
        except Exception as e:  # noqa: BLE001 - offline: say how to give the file instead
            raise VocabError(f"could not download o200k_base ({type(e).__name__}: {e}); offline, set ${VOCAB_ENV} "
                             f"to a local {VOCAB_FILENAME} (SHA-256 {O200K_SHA256})") from e
        ranks, pattern = base._mergeable_ranks, base._pat_str
    else:
        ranks, pattern = read_vocab(path), O200K_PATTERN
    return tiktoken.Encoding(name="o200k_harmony", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens=HARMONY_SPECIAL_TOKENS)


def load_tokenizer(vocab: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """The o200k_harmony ``tiktoken.Encoding`` (n_vocab 201088), from ``vocab`` or :func:`find_vocab`."""
    return _load(find_vocab(vocab))


#: pre-tokenizer pieces longer than this (characters) are cut into pieces of this length before BPE by
#: :func:`encode_bounded`. No o200k token is longer than 128 bytes, and ordinary text (prose, code, URLs,
#: base64) has no piece anywhere near this long: only runs such as 10,000 'a' or spaces are cut.
MAX_PIECE_CHARS = 4096


@functools.lru_cache(maxsize=1)
def _pretokenizer() -> regex.Pattern:
    return regex.compile(O200K_PATTERN)


def long_piece(text: str, limit: int) -> int:
    """Length of the longest pre-tokenizer piece of ``text`` if it exceeds ``limit`` characters, else 0."""
    if len(text) <= limit:
        return 0
    return max((n for m in _pretokenizer().finditer(text) if (n := m.end() - m.start()) > limit), default=0)


def encode_bounded(tokenizer: tiktoken.Encoding, text: str, max_piece: int = MAX_PIECE_CHARS) -> list[int]:
    """``tokenizer.encode_ordinary(text)`` in time linear in ``len(text)``, whatever the text.

    Pre-tokenizes with the ``regex`` package (tiktoken's Rust regex overflows its stack on a run of
    ~1M spaces) and runs BPE piece by piece (tokens never cross pieces, so this is exact), cutting pieces
    longer than ``max_piece`` characters first: ids differ from tiktoken's only inside such runs.
    """
    core = tokenizer._core_bpe
    out: list[int] = []
    for m in _pretokenizer().finditer(text):
        piece = m.group()
        for i in range(0, len(piece), max_piece):
            out += core.encode_single_piece(piece[i:i + max_piece].encode("utf-8"))
    return out


_SPECIAL_TEXT = regex.compile(r"<\|[a-z0-9_]+\|>")


def encode_special(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """``tokenizer.encode(text, allowed_special="all")`` in linear time (:func:`encode_bounded` between the
    harmony special tokens, which are recognised wherever they appear)."""
    out, pos = [], 0
    for m in _SPECIAL_TEXT.finditer(text):
        if (special := HARMONY_SPECIAL_TOKENS.get(m.group())) is not None:
            out += encode_bounded(tokenizer, text[pos:m.start()]) + [special]
            pos = m.end()
    return out + encode_bounded(tokenizer, text[pos:])


class TextStream:
    """Token ids -> text pieces, holding back the bytes of a UTF-8 character split across tokens."""

    def __init__(self, tokenizer: tiktoken.Encoding):
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._utf8.decode(self.tokenizer.decode_single_token_bytes(token))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
