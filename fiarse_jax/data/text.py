"""AG News (TFDS ``ag_news_subset``) as token ids, for the paper's RoBERTa experiments.

Text: each example's ``title + " " + description`` (the two TFDS fields joined by one
space, as the usual single-``text`` versions of AG News are built). Labels: the 4 topics.
The data route is CIFAR's (``tfds.data_source``, no TensorFlow; the same fail-fast
errors when the data is absent; ``mock_examples`` for ``tfds.testing.mock_data``,
whose texts are random letters). Install with ``pip install -e ".[text]"``.

Tokenizer (``tokenizer=``), both through the ``tokenizers`` library:

* ``"bpe"`` (default, offline): a byte-level BPE trained on the *training* split only,
  with RoBERTa's special tokens at RoBERTa's ids (``<s>``=0, ``<pad>``=1, ``</s>``=2,
  ``<unk>``=3, ``<mask>``=4). Training is deterministic; the result is cached as JSON
  under ``data_dir`` (TFDS's default data dir when None), in a file named by the
  vocabulary size and a hash of the training texts, and reloaded on a cache hit.
* a pretrained tokenizer (the paper's ``roberta-base``): a path to a ``tokenizer.json``
  (or a folder holding one), or a Hugging Face hub name looked up in the local hub
  cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
  Only ``download=True`` fetches from the hub.

Every example becomes RoBERTa's ``<s> text </s>``, truncated to ``max_length`` (the
text is cut, ``</s>`` stays last) and padded with ``<pad>`` to exactly ``max_length``.
The attention mask is not stored: the model derives it as ``ids != pad_token_id``
(``Dataset.model_options`` carries ``vocab_size``, ``pad_token_id`` and ``max_length``).
``check_config`` validates config.data's fields for AG News before anything is read.
"""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fiarse_jax.data import checks
from fiarse_jax.data import tfds as tfds_data
from fiarse_jax.data.tfds import DataUnavailable
from fiarse_jax.data.types import Dataset
from fiarse_jax.utils import hub

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TFDS_NAME = "ag_news_subset"
NUM_CLASSES = 4
#: where TFDS downloads AG News from (checked before a download starts)
DOWNLOAD_HOST = "drive.google.com"
#: RoBERTa's special tokens, in the order of their ids 0..4.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
#: the smallest trainable BPE vocabulary: the 256-byte alphabet plus the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
#: ``<s>``, one token of text, ``</s>``.
MIN_MAX_LENGTH = 3
#: changes whenever the BPE recipe below changes, so old cache files are not reused.
_BPE_RECIPE = "byte-level-bpe/roberta-specials/v1"
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataUnavailable("text data needs tokenizers: pip install -e \".[text]\"") from None
    return tokenizers


# --- the offline byte-level BPE ------------------------------------------------------

def train_bpe(texts: Sequence[str], vocab_size: int = 8000) -> Tokenizer:
    """A byte-level BPE (RoBERTa's pre-tokenizer, decoder and ``<s> … </s>`` post-processor)
    trained on ``texts`` up to ``vocab_size`` tokens, RoBERTa's special tokens at ids 0–4.

    Deterministic: the same texts give the same tokenizer JSON. Byte-level, so every
    string encodes without ``<unk>`` and decodes back to itself. Not cached (see
    ``get_tokenizer``).
    """
    _check_vocab_size(vocab_size)
    tk = _tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=int(vocab_size), special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.post_processor = tk.processors.RobertaProcessing(
        ("</s>", SPECIAL_TOKENS.index("</s>")), ("<s>", SPECIAL_TOKENS.index("<s>")),
        trim_offsets=True, add_prefix_space=False)
    return tok


def bpe_cache_path(texts: Sequence[str], vocab_size: int, cache_dir: str) -> Path:
    """Where the BPE trained on ``texts`` is cached: ``cache_dir/fiarse_tokenizers/
    bpe-<vocab_size>-<hash of recipe and texts>.json``."""
    h = hashlib.sha256(_BPE_RECIPE.encode())
    for t in texts:   # length-prefixed, so no two different lists hash alike by concatenation
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    name = f"bpe-{int(vocab_size)}-{h.hexdigest()[:16]}.json"
    return Path(os.path.expanduser(cache_dir)) / "fiarse_tokenizers" / name


def _cached_bpe(texts: Sequence[str], vocab_size: int, cache_dir: str) -> Tokenizer:
    path = bpe_cache_path(texts, vocab_size, cache_dir)
    if path.is_file():
        return _tokenizers().Tokenizer.from_file(str(path))
    tok = train_bpe(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(tok.to_str())
    os.replace(tmp, path)   # atomic: a concurrent reader never sees half a file
    return tok


# --- pretrained tokenizers -----------------------------------------------------------

#: The hub cache (``HF_HUB_CACHE`` / ``HF_HOME`` …); one rule for tokenizers and weights.
hub_cache_dir = hub.cache_dir


def _looks_like_path(value: str) -> bool:
    """A file path rather than a hub name (``org/name`` has one slash, no suffix)."""
    return (value.endswith((".json", "/")) or value.startswith(("/", ".", "~"))
            or value.count("/") > 1 or (os.sep != "/" and os.sep in value))


def _pretrained(value: str, download: bool) -> Tokenizer:
    tk = _tokenizers()
    path = Path(os.path.expanduser(value))
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return tk.Tokenizer.from_file(str(path))
    if _looks_like_path(value):
        raise DataUnavailable(
            f"config.data.tokenizer = {value!r}: no tokenizer file at {path}. Pass the path "
            "of an existing tokenizer.json (or of a folder holding one), a Hugging Face hub "
            "name such as 'roberta-base', or 'bpe' for the offline tokenizer.")
    _check_tokenizer_value(value)
    cached = hub.cached_file(value, "tokenizer.json")
    if cached is not None:
        return tk.Tokenizer.from_file(str(cached))
    if not download:
        raise DataUnavailable(
            f"config.data.tokenizer = {value!r} is not in the Hugging Face hub cache "
            f"({hub_cache_dir()}; set by HF_HUB_CACHE or HF_HOME). Set "
            "--config.data.download=True on a machine with internet, or copy its "
            "tokenizer.json here and pass its path as config.data.tokenizer, or use "
            "tokenizer='bpe' (offline).")
    try:   # the same download (and reachability check) as pretrained weights
        return tk.Tokenizer.from_file(str(hub.download(value, "tokenizer.json")))
    except FileNotFoundError as e:
        raise DataUnavailable(
            f"config.data.tokenizer = {value!r}: {e}. Download its tokenizer.json on a "
            "machine with internet and pass its path as config.data.tokenizer.") from None


# --- one entry point, and the encoder ------------------------------------------------

def _check_vocab_size(vocab_size: int) -> None:
    if int(vocab_size) != vocab_size or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size = {vocab_size!r}: the byte-level BPE needs an integer "
                         f">= {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")


def _check_max_length(max_length: int) -> None:
    if int(max_length) != max_length or max_length < MIN_MAX_LENGTH:
        raise ValueError(f"max_length = {max_length!r}: needs an integer >= {MIN_MAX_LENGTH} "
                         "(<s>, one token of text, </s>)")


def _check_tokenizer_value(tokenizer: str) -> None:
    if not (isinstance(tokenizer, str) and tokenizer.strip() and (
            tokenizer == "bpe" or _looks_like_path(tokenizer) or _HUB_NAME.fullmatch(tokenizer)
            or os.path.exists(os.path.expanduser(tokenizer)))):
        raise ValueError(f"unknown tokenizer {tokenizer!r}: expected 'bpe', a path to a "
                         "tokenizer.json, or a Hugging Face hub name such as 'roberta-base'")


def get_tokenizer(tokenizer: str = "bpe", *, train_texts: Sequence[str] | None = None,
                  vocab_size: int = 8000, cache_dir: str | None = None,
                  download: bool = False) -> Tokenizer:
    """The tokenizer ``tokenizer`` names (see the module docstring).

    ``"bpe"`` trains on ``train_texts`` (required) or reloads the cached result from
    ``cache_dir`` (TFDS's default data dir when None); other values load a pretrained
    ``tokenizer.json`` (``vocab_size``, ``train_texts`` and ``cache_dir`` unused).
    Raises ``ValueError`` for bad values, ``DataUnavailable`` for a missing file.
    """
    _check_tokenizer_value(tokenizer)
    if tokenizer == "bpe":
        _check_vocab_size(vocab_size)
        if train_texts is None:
            raise ValueError("tokenizer 'bpe' is trained on the training texts: pass train_texts")
        return _cached_bpe(train_texts, vocab_size, cache_dir or tfds_data.default_data_dir())
    return _pretrained(tokenizer, download)


def special_ids(tok: Tokenizer) -> tuple[int, int, int]:
    """``(<s>, </s>, <pad>)`` ids of a RoBERTa-style tokenizer; ValueError if one is missing."""
    ids = tuple(tok.token_to_id(t) for t in ("<s>", "</s>", "<pad>"))
    if None in ids:
        raise ValueError("not a RoBERTa-style tokenizer: it lacks one of <s>, </s>, <pad> "
                         f"(ids {dict(zip(('<s>', '</s>', '<pad>'), ids))})")
    return ids


def encode(tok: Tokenizer, texts: Sequence[str], max_length: int) -> np.ndarray:
    """``texts`` as int32 ids ``[len(texts), max_length]``: ``<s> text </s>``, the text cut
    to ``max_length - 2`` tokens, then ``<pad>`` to the end.

    The special tokens are placed here rather than by the tokenizer's post-processor, so
    every tokenizer gives this format whatever its JSON configures (its own padding and
    truncation are ignored; ``tok`` is left unchanged).
    A special token's spelling inside a text (a literal ``"</s>"``) is encoded as plain
    text, so every row holds exactly one ``<s>`` and one ``</s>``.
    """
    _check_max_length(max_length)
    bos, eos, pad = special_ids(tok)
    if tok.padding is not None or tok.truncation is not None:   # a copy without them
        tok = _tokenizers().Tokenizer.from_str(tok.to_str())
        tok.no_padding()
        tok.no_truncation()
    as_text = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        encs = tok.encode_batch(list(texts), add_special_tokens=False)
    finally:
        tok.encode_special_tokens = as_text
    out = np.full((len(encs), max_length), pad, np.int32)
    out[:, 0] = bos
    for i, e in enumerate(encs):
        ids = e.ids[:max_length - 2]
        out[i, 1:1 + len(ids)] = ids
        out[i, 1 + len(ids)] = eos
    return out


# --- AG News -------------------------------------------------------------------------

def _decode(v) -> str:
    v = v.item() if isinstance(v, np.ndarray) else v
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _texts_labels(records: list[dict]) -> tuple[list[str], np.ndarray]:
    texts = [_decode(r["title"]) + " " + _decode(r["description"]) for r in records]
    return texts, np.asarray([int(r["label"]) for r in records], np.int32)


def _read(splits: Sequence[str], data_dir: str | None, download: bool, mock_examples: int):
    return [_texts_labels(r) for r in tfds_data.read_tfds_splits(
        "ag_news", TFDS_NAME, DOWNLOAD_HOST, splits=splits, data_dir=data_dir,
        download=download, mock_examples=mock_examples, extra="text")]


def ag_news_tokenizer(*, data_dir: str | None = None, download: bool = False,
                      mock_examples: int = 0, tokenizer: str = "bpe",
                      vocab_size: int = 8000) -> Tokenizer:
    """The tokenizer ``load_ag_news`` with the same options uses (to decode its ids, or
    to encode new text alike); reads the training split only for ``"bpe"``."""
    _check_tokenizer_value(tokenizer)
    if tokenizer != "bpe":
        return _pretrained(tokenizer, download)
    _check_vocab_size(vocab_size)
    [(texts, _)] = _read(("train",), data_dir, download, mock_examples)
    return get_tokenizer("bpe", train_texts=texts, vocab_size=vocab_size, cache_dir=data_dir)


def load_ag_news(*, data_dir: str | None = None, download: bool = False, mock_examples: int = 0,
                 tokenizer: str = "bpe", vocab_size: int = 8000,
                 max_length: int = 128) -> Dataset:
    """AG News (120,000 train / 7,600 test, 4 classes) as int32 token ids ``[n, max_length]``.

    ``data_dir``/``download``/``mock_examples`` as for CIFAR; ``tokenizer``: ``"bpe"``
    (trained on the training split, ``vocab_size`` ≥ 261 tokens, cached under
    ``data_dir``), a ``tokenizer.json`` path or a hub name (``vocab_size`` unused);
    ``max_length`` ≥ 3 tokens including ``<s>`` and ``</s>``. No transforms;
    ``model_options`` = ``{"vocab_size", "pad_token_id", "max_length"}``.
    """
    _check_tokenizer_value(tokenizer)
    _check_max_length(max_length)
    if tokenizer == "bpe":
        _check_vocab_size(vocab_size)
    else:   # a missing pretrained tokenizer fails before the data is read
        tok = _pretrained(tokenizer, download)
    (texts, y), (test_texts, ty) = _read(("train", "test"), data_dir, download, mock_examples)
    if tokenizer == "bpe":
        tok = get_tokenizer("bpe", train_texts=texts, vocab_size=vocab_size, cache_dir=data_dir)
    x, tx = encode(tok, texts, max_length), encode(tok, test_texts, max_length)
    if mock_examples > 0:   # mock labels are random; fold them into the classes
        y, ty = y % NUM_CLASSES, ty % NUM_CLASSES
    _, _, pad = special_ids(tok)
    return Dataset(x=x, y=y, num_classes=NUM_CLASSES, test_x=tx, test_y=ty,
                   model_options={"vocab_size": tok.get_vocab_size(with_added_tokens=True),
                                  "pad_token_id": pad, "max_length": int(max_length)})


def check_config(data) -> None:
    """config.data's fields for AG News: the TFDS source's, then ``tokenizer`` (a non-empty
    string), ``vocab_size`` ≥ ``MIN_VOCAB_SIZE`` and ``max_length`` ≥ ``MIN_MAX_LENGTH``."""
    tfds_data.check_source_options(data)
    if "tokenizer" in data and (not isinstance(data["tokenizer"], str) or not data["tokenizer"]):
        checks.fail("tokenizer", data["tokenizer"], "must be 'bpe', a tokenizer.json path or a "
                    "Hugging Face hub name")
    if "vocab_size" in data:
        checks.integer(data, "vocab_size", lo=MIN_VOCAB_SIZE)   # 256 bytes + 5 specials
    if "max_length" in data:
        checks.integer(data, "max_length", lo=MIN_MAX_LENGTH)
