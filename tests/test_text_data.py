"""The AG News path: tokenizers (offline BPE, pretrained JSON / hub cache), the RoBERTa
encoding, and the TFDS loader on mock data."""
import time

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
tokenizers = pytest.importorskip("tokenizers")

from fiarse_jax.data import DATASETS, load_dataset, text  # noqa: E402
from fiarse_jax.data import tfds as tfds_data  # noqa: E402
from fiarse_jax.data.tfds import DataUnavailable  # noqa: E402
from fiarse_jax.utils import hub  # noqa: E402

SENTENCES = [
    "Oil prices rose sharply on Tuesday after a pipeline outage in the Gulf of Mexico.",
    "The Red Sox beat the Yankees 5-3 to take the lead in the American League East.",
    "Apple's third-quarter profit jumped 60%, beating Wall Street's estimates.",
    "Scientists say the new telescope could find Earth-like planets around nearby stars.",
    "Café owners in São Paulo — and their naïve customers — paid €4.50 for coffee \U0001F642.",
    "  Two leading spaces,\ttabs, and a\nnew line.",
]


@pytest.fixture(scope="module")
def corpus():
    """A few thousand English-like lines (the sentences with numbered variations)."""
    return [f"{s} Story {i} of {n}." for n in range(40) for i, s in enumerate(SENTENCES)]


@pytest.fixture(scope="module")
def bpe(corpus):
    return text.train_bpe(corpus, vocab_size=500)


def reference_encoding(tok, texts, max_length):
    """tokenizers' own RoBERTa format: its post-processor adds <s> … </s>, its truncation
    and padding fix the length (an independent route to what ``text.encode`` builds)."""
    ref = tokenizers.Tokenizer.from_str(tok.to_str())
    ref.post_processor = tokenizers.processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    ref.enable_truncation(max_length)
    ref.enable_padding(pad_id=1, pad_token="<pad>", length=max_length)
    return np.array([e.ids for e in ref.encode_batch(texts)], np.int32)


def check_rows(ids, max_length):
    """<s> first, exactly one </s>, nothing but <pad> after it, no special inside the text."""
    assert ids.dtype == np.int32 and ids.shape[1] == max_length
    for row in ids:
        assert row[0] == 0
        assert np.count_nonzero(row == 2) == 1
        end = int(np.argmax(row == 2))
        assert np.all(row[end + 1:] == 1)
        assert np.all(row[1:end] > 4)          # text tokens only: no special id inside


def test_mock_ag_news_end_to_end(tmp_path):
    ds = load_dataset("ag_news", data_dir=str(tmp_path), mock_examples=64, vocab_size=1000,
                      max_length=48)
    assert ds.x.shape == (64, 48) and ds.test_x.shape == (64, 48)
    check_rows(ds.x, 48)
    check_rows(ds.test_x, 48)
    assert ds.num_classes == 4 and ds.y.dtype == np.int32 and ds.test_y.dtype == np.int32
    assert ds.y.min() >= 0 and ds.y.max() < 4 and ds.test_y.max() < 4
    assert ds.train_transform is None and ds.eval_transform is None
    tok = text.ag_news_tokenizer(data_dir=str(tmp_path), mock_examples=64, vocab_size=1000)
    assert ds.model_options == {"vocab_size": tok.get_vocab_size(), "pad_token_id": 1,
                                "max_length": 48}
    assert ds.x.max() < tok.get_vocab_size()
    # Each row decodes to its record's title + " " + description (read here straight from TFDS).
    with tfds.testing.mock_data(num_examples=64):
        src = tfds.data_source("ag_news_subset", split="train")
        records = [src[i] for i in range(len(src))]
    want = [f"{r['title']} {r['description']}" for r in records]
    np.testing.assert_array_equal(ds.y, [int(r["label"]) % 4 for r in records])
    assert [tok.decode(row.tolist()) for row in ds.x] == want
    np.testing.assert_array_equal(ds.x, reference_encoding(tok, want, 48))
    assert DATASETS["ag_news"].options == (
        "data_dir", "download", "mock_examples", "tokenizer", "vocab_size", "max_length")


def test_bpe_is_deterministic_with_roberta_special_ids(corpus, bpe):
    again = text.train_bpe(corpus, vocab_size=500)
    assert again.to_str() == bpe.to_str()
    specials = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
    assert [bpe.token_to_id(t) for t in specials] == [0, 1, 2, 3, 4]
    assert bpe.get_vocab_size() == 500
    assert text.train_bpe(corpus[::-1], vocab_size=500).get_vocab_size() == 500


def test_bpe_round_trips_text(bpe):
    unseen = ["Microsoft unveils a tablet; rivals shrug.", "Ünïcödé ∑ and \U0001F680 rockets!"]
    for s in SENTENCES + unseen:
        enc = bpe.encode(s)
        assert enc.ids[0] == 0 and enc.ids[-1] == 2
        assert 3 not in enc.ids                 # byte-level: never <unk>
        assert bpe.decode(enc.ids) == s
    rows = text.encode(bpe, SENTENCES + unseen, 64)
    assert [bpe.decode(r.tolist()) for r in rows] == SENTENCES + unseen


def test_encode_matches_tokenizers_and_truncation_keeps_eos_last(bpe):
    long = " ".join(SENTENCES * 3)
    texts = SENTENCES + [long, ""]
    for max_length in (3, 8, 40):
        got = text.encode(bpe, texts, max_length)
        np.testing.assert_array_equal(got, reference_encoding(bpe, texts, max_length))
        check_rows(got[:-1], max_length)       # the empty text is <s> </s> <pad>…
        assert got[len(SENTENCES), -1] == 2   # the long text is cut, </s> stays last
    assert text.encode(bpe, [""], 4).tolist() == [[0, 2, 1, 1]]
    # The tokenizer's own padding / truncation settings neither change the result nor
    # are changed.
    padded = tokenizers.Tokenizer.from_str(bpe.to_str())
    padded.enable_padding(pad_id=1, pad_token="<pad>", length=50)
    padded.enable_truncation(10)
    np.testing.assert_array_equal(text.encode(padded, texts, 40), text.encode(bpe, texts, 40))
    assert padded.padding["length"] == 50 and padded.truncation["max_length"] == 10
    # A special token's spelling inside a text is plain text, not a control token.
    row = text.encode(bpe, ["a </s> b <pad> c"], 32)[0]
    check_rows(row[None], 32)
    assert bpe.decode(row.tolist()) == "a </s> b <pad> c"
    assert bpe.encode_special_tokens is False        # the switch is restored


def test_bpe_cache_is_created_named_and_reused(tmp_path, monkeypatch, corpus):
    texts = corpus[:500]
    tok = text.get_tokenizer("bpe", train_texts=texts, vocab_size=400, cache_dir=str(tmp_path))
    path = text.bpe_cache_path(texts, 400, str(tmp_path))
    assert path.is_file() and path.name.startswith("bpe-400-")
    assert path.read_text() == tok.to_str()
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temporary left

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache holds this tokenizer")
    monkeypatch.setattr(text, "train_bpe", no_training)
    again = text.get_tokenizer("bpe", train_texts=texts, vocab_size=400, cache_dir=str(tmp_path))
    assert again.to_str() == tok.to_str()
    # Other texts or another size name another file (so they would retrain).
    assert text.bpe_cache_path(texts[:-1], 400, str(tmp_path)) != path
    assert text.bpe_cache_path(texts, 401, str(tmp_path)) != path
    with pytest.raises(AssertionError, match="retrained"):
        text.get_tokenizer("bpe", train_texts=texts[:-1], vocab_size=400,
                           cache_dir=str(tmp_path))
    # Without a cache_dir the cache is TFDS's default data dir.
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds"))
    with pytest.raises(AssertionError, match="retrained"):
        text.get_tokenizer("bpe", train_texts=texts, vocab_size=400)
    (tmp_path / "tfds").mkdir()
    path.parent.rename(tmp_path / "tfds" / path.parent.name)
    assert text.get_tokenizer("bpe", train_texts=texts, vocab_size=400).to_str() == tok.to_str()


def test_bpe_trains_on_the_training_split_only(tmp_path, monkeypatch):
    seen = []
    real = text.train_bpe

    def spy(texts, vocab_size=8000):
        seen.append(list(texts))
        return real(texts, vocab_size)
    monkeypatch.setattr(text, "train_bpe", spy)
    text.load_ag_news(data_dir=str(tmp_path), mock_examples=16, vocab_size=300, max_length=8)
    with tfds.testing.mock_data(num_examples=16):
        src = tfds.data_source("ag_news_subset", split="train")
        want = [f"{src[i]['title']} {src[i]['description']}" for i in range(len(src))]
    assert seen == [want]


def test_pretrained_tokenizer_json_by_path(tmp_path, bpe):
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    bpe.save(str(path))
    for value in (str(path), str(path.parent)):
        tok = text.get_tokenizer(value)
        np.testing.assert_array_equal(text.encode(tok, SENTENCES, 40),
                                      text.encode(bpe, SENTENCES, 40))
        assert [tok.encode(s).ids for s in SENTENCES] == [bpe.encode(s).ids for s in SENTENCES]
    # The loader with that file = the loader with the BPE it came from.
    by_bpe = text.load_ag_news(data_dir=str(tmp_path), mock_examples=16, vocab_size=300,
                               max_length=16)
    cached = text.ag_news_tokenizer(data_dir=str(tmp_path), mock_examples=16, vocab_size=300)
    cached.save(str(path))
    by_path = text.load_ag_news(data_dir=str(tmp_path), mock_examples=16, tokenizer=str(path),
                                vocab_size=1, max_length=16)        # vocab_size unused here
    np.testing.assert_array_equal(by_path.x, by_bpe.x)
    assert by_path.model_options == by_bpe.model_options
    with pytest.raises(DataUnavailable, match="missing.json"):
        text.get_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(DataUnavailable, match="missing.json"):   # before any data is read
        text.load_ag_news(data_dir=str(tmp_path / "empty"),
                          tokenizer=str(tmp_path / "missing.json"))


def test_hub_names_come_from_the_local_cache_only(tmp_path, monkeypatch, bpe):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "online", lambda timeout=5.0: False)
    t = time.time()
    with pytest.raises(DataUnavailable, match="'roberta-base' is not in the Hugging Face hub"):
        text.get_tokenizer("roberta-base")
    with pytest.raises(DataUnavailable, match="cannot be reached"):
        text.get_tokenizer("FacebookAI/roberta-base", download=True)
    assert time.time() - t < 10
    # The hub cache layout: models--org--name/refs/main names the snapshot.
    repo = tmp_path / "hub" / "models--FacebookAI--roberta-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    bpe.save(str(repo / "snapshots" / "abc123" / "tokenizer.json"))
    assert text.get_tokenizer("FacebookAI/roberta-base").to_str() == bpe.to_str()
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert text.hub_cache_dir() == tmp_path / "home" / "hub"


def test_bad_values_raise_naming_the_value(tmp_path):
    # Checked before any data is read (data_dir is empty and no mock data is asked for).
    opts = dict(data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="vocab_size = 260"):
        text.load_ag_news(vocab_size=260, **opts)
    with pytest.raises(ValueError, match="max_length = 2"):
        text.load_ag_news(max_length=2, **opts)
    for bad in ("", "no such tokenizer", "roberta base"):
        with pytest.raises(ValueError, match=f"unknown tokenizer {bad!r}"):
            text.load_ag_news(tokenizer=bad, **opts)
    with pytest.raises(ValueError, match="vocab_size = 100"):
        text.train_bpe(["a b c"], 100)
    with pytest.raises(ValueError, match="max_length = 1"):
        text.encode(text.train_bpe(["a b c"], 300), ["a"], 1)
    no_roberta = tokenizers.Tokenizer(tokenizers.models.BPE())
    with pytest.raises(ValueError, match="RoBERTa-style"):
        text.encode(no_roberta, ["a"], 8)


def test_missing_data_fails_fast_with_instructions(tmp_path, monkeypatch):
    t = time.time()
    with pytest.raises(DataUnavailable, match="ag_news is not prepared under config.data"):
        text.load_ag_news(data_dir=str(tmp_path))
    monkeypatch.setattr(tfds_data, "_online", lambda host, timeout=5.0: False)
    with pytest.raises(DataUnavailable, match="drive.google.com cannot be reached"):
        text.load_ag_news(data_dir=str(tmp_path), download=True)
    assert time.time() - t < 30
    assert not any(tmp_path.rglob("*.array_record*"))


def test_records_as_bytes_decode_like_strings():
    # Prepared TFDS data gives text features as bytes; mock data gives str.
    records = [{"title": np.asarray(b"Caf\xc3\xa9 news", object), "description": b"desc",
                "label": np.asarray(2)},
               {"title": "Plain", "description": "text", "label": 1}]
    texts, labels = text._texts_labels(records)
    assert texts == ["Café news desc", "Plain text"] and labels.tolist() == [2, 1]
