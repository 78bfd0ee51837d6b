"""Data: sources, tokenizers, the encoded-id cache and batches. Never touches the internet."""
import functools
import hashlib
import http.server
import json
import os
import threading
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from minimosaic import data
from minimosaic.errors import MinimosaicError

SHARED_DATA = Path("/work/shared/data")


@pytest.fixture(scope="module")
def stories():
    return data.generate_stories(200_000, seed=3)


# ---------------------------------------------------------------------------------------------- sources

def test_stories_are_deterministic_sized_and_ascii():
    a, b, c = data.generate_stories(50_000, seed=1), data.generate_stories(50_000, seed=1), \
        data.generate_stories(50_000, seed=2)
    assert a == b and a != c
    assert 50_000 <= len(a) < 52_000 and a.isascii()
    text, name = data.load_text(None)
    assert name == "stories" and len(text) >= 1_000_000 and text == data.generate_stories()


def test_stories_names_recur_and_vary(stories):
    docs = stories.split("\n\n")
    assert len(docs) > 100
    for doc in docs[:50]:
        first_sentence, rest = doc.split(".", 1)
        hero = [w for w in first_sentence.split() if w in data._NAMES][-1]
        assert hero in rest  # the name introduced first is used again later
    heroes = Counter(w for doc in docs for w in doc.split(".", 1)[0].split() if w in data._NAMES)
    assert len(heroes) > 40  # dozens of names, not a handful


def test_load_text_file_name_and_bom(tmp_path):
    path = tmp_path / "poems.txt"
    path.write_bytes("\ufeffSnow on the pine. Été!\n".encode("utf-8"))
    text, name = data.load_text(str(path))
    assert text == "Snow on the pine. Été!\n" and name == "poems"


@pytest.mark.parametrize("content, message", [(None, "does not exist"), (b"", "is empty"),
                                              (b"  \n\n", "is empty"), (b"caf\xe9 au lait", "not UTF-8")])
def test_load_text_file_errors(tmp_path, content, message):
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MinimosaicError, match=message) as info:
        data.load_text(str(path))
    assert "\n" not in str(info.value)


def test_load_text_directory_and_unknown_dataset(tmp_path):
    with pytest.raises(MinimosaicError, match="is a directory"):
        data.load_text(str(tmp_path))
    with pytest.raises(MinimosaicError, match="unknown dataset 'shakespear'.*shakespeare"):
        data.load_text("shakespear", data_dir=tmp_path)
    with pytest.raises(MinimosaicError, match="unknown dataset"):
        data.download_dataset("nope", tmp_path)


def test_default_data_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIMOSAIC_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data.default_data_dir() == tmp_path / "xdg" / "minimosaic"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert data.default_data_dir() == Path.home() / ".cache" / "minimosaic"
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "mine"))
    assert data.default_data_dir() == tmp_path / "mine"
    assert data.dataset_path("shakespeare") == tmp_path / "mine" / "tinyshakespeare.txt"
    assert data.dataset_path("shakespeare", tmp_path) == tmp_path / "tinyshakespeare.txt"


@pytest.fixture
def no_internet(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the test tried to download something")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.mark.skipif(not (SHARED_DATA / "tinyshakespeare.txt").is_file(), reason="no shared data dir")
def test_shared_shakespeare_is_verified_and_used_without_download(no_internet):
    path = data.download_dataset("shakespeare", SHARED_DATA)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.DATASETS["shakespeare"].sha256
    text, name = data.load_text("shakespeare", data_dir=SHARED_DATA)
    assert name == "shakespeare" and text.startswith("First Citizen:")
    row = [r for r in data.list_datasets(SHARED_DATA) if r["name"] == "shakespeare"][0]
    assert row["cached"] and row["path"] == str(path)


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (www, base_url)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield www, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _register(monkeypatch, url, sha256):
    monkeypatch.setitem(data.DATASETS, "tiny", data.Dataset(url=url, sha256=sha256, filename="tiny.txt",
                                                            description="a test file"))


def test_download_verifies_caches_and_renames(monkeypatch, local_server, tmp_path):
    www, base = local_server
    payload = "Tiny text for a tiny test.\n".encode() * 50
    (www / "tiny.txt").write_bytes(payload)
    _register(monkeypatch, f"{base}/tiny.txt", hashlib.sha256(payload).hexdigest())
    cache = tmp_path / "cache"
    assert not [r for r in data.list_datasets(cache) if r["name"] == "tiny"][0]["cached"]
    path = data.download_dataset("tiny", cache)
    assert path == cache / "tiny.txt" and path.read_bytes() == payload
    assert sorted(os.listdir(cache)) == ["tiny.txt"]  # no temp file left behind
    (www / "tiny.txt").unlink()  # the cached copy is used from now on
    text, name = data.load_text("tiny", data_dir=cache)
    assert text == payload.decode() and name == "tiny"


def test_download_hash_mismatch_and_network_failure(monkeypatch, local_server, tmp_path):
    www, base = local_server
    (www / "tiny.txt").write_bytes(b"not what was promised")
    _register(monkeypatch, f"{base}/tiny.txt", "0" * 64)
    with pytest.raises(MinimosaicError, match="sha256 .* was expected"):
        data.download_dataset("tiny", tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []  # neither the bad file nor a temp file
    _register(monkeypatch, f"{base}/missing.txt", "0" * 64)
    with pytest.raises(MinimosaicError, match="could not download 'tiny'.*404"):
        data.download_dataset("tiny", tmp_path / "cache")
    _register(monkeypatch, "http://127.0.0.1:9/tiny.txt", "0" * 64)  # port 9: nobody listens
    with pytest.raises(MinimosaicError, match="could not download 'tiny'.*network"):
        data.load_text("tiny", data_dir=tmp_path / "cache")
    assert os.listdir(tmp_path / "cache") == []


def test_download_into_unwritable_place(monkeypatch, tmp_path):
    (tmp_path / "a_file").write_text("x")
    _register(monkeypatch, "http://127.0.0.1:9/tiny.txt", "0" * 64)
    with pytest.raises(MinimosaicError, match="MINIMOSAIC_DATA_DIR"):
        data.download_dataset("tiny", tmp_path / "a_file" / "sub")


# ------------------------------------------------------------------------------------------- tokenizers

def _respec(tokenizer):
    """Through JSON and back, as a checkpoint would do."""
    return data.tokenizer_from_spec(json.loads(json.dumps(tokenizer.spec())))


def test_char_tokenizer_round_trip_and_spec():
    text = "hello wörld, ünïcode 🙂 and tabs\t\n"
    tok = data.build_tokenizer("char", text)
    assert tok.vocab_size == len(set(text)) and list(tok.chars) == sorted(set(text))
    ids = tok.encode(text)
    assert isinstance(ids, list) and ids == [sorted(set(text)).index(ch) for ch in text]
    assert tok.decode(ids) == text and tok.decode(np.array(ids)) == text
    again = _respec(tok)
    assert again.encode(text) == ids and again.vocab_size == tok.vocab_size
    with pytest.raises(MinimosaicError, match="'z'.*not in"):
        tok.encode("hellz")


def _reference_bpe(text, vocab_size):
    """The plain algorithm: recount every pair of every chunk before each merge."""
    import regex
    words = Counter(tuple(c.encode()) for c in regex.findall(data.PAT_STR, text))
    token_bytes = [bytes([i]) for i in range(256)]
    merges = []
    while len(token_bytes) < vocab_size:
        pairs = Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = token_bytes[best[0]] + token_bytes[best[1]]
        if merged in token_bytes:
            new = token_bytes.index(merged)
        else:
            new = len(token_bytes)
            token_bytes.append(merged)
            merges.append(best)
        words = Counter({tuple(data._merge_pair(list(w), best, new)): f for w, f in words.items()})
    return merges


def test_bpe_training_matches_the_plain_algorithm(stories):
    text = stories[:20_000] + " aaaa aaaaa abab ababab"  # overlapping pairs and repeated byte strings
    assert data.train_bpe(text, 420) == _reference_bpe(text, 420)


def test_bpe_tokenizer_round_trip_spec_and_compression(stories):
    tok = data.build_tokenizer("token", stories, tokenizer="bpe", vocab_size=512)
    assert tok.vocab_size == 512
    ids = tok.encode_array(stories)
    assert ids.min() >= 0 and ids.max() < 512
    assert len(ids) < len(stories) / 2.5  # merges do compress the text they were trained on
    unseen = "Zebras 🦓 jumped over 42 quixotic ñandúes!\n"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: every text encodes and decodes back
    assert tok.decode(ids[:300]) == stories[:len(tok.decode(ids[:300]))]
    again = _respec(tok)
    assert again.spec() == tok.spec() and np.array_equal(again.encode_array(stories), ids)
    assert data.BPETokenizer.train(stories, 512).merges == tok.merges  # deterministic


def test_bpe_stops_when_no_pairs_are_left():
    tok = data.build_tokenizer("token", "ab ab ab", vocab_size=1000)
    assert tok.vocab_size < 1000 and tok.decode(tok.encode("ab ba")) == "ab ba"


@pytest.mark.parametrize("vocab_size", [256, 100_000])
def test_bpe_vocab_size_out_of_range(vocab_size):
    with pytest.raises(MinimosaicError, match="vocab size"):
        data.build_tokenizer("token", "some text", vocab_size=vocab_size)


def test_unknown_level_and_tokenizer():
    with pytest.raises(MinimosaicError, match="unknown level 'word'"):
        data.build_tokenizer("word", "text")
    with pytest.raises(MinimosaicError, match="unknown tokenizer 'gpt5'.*bpe.*gpt2"):
        data.build_tokenizer("token", "text", tokenizer="gpt5")
    with pytest.raises(MinimosaicError, match="unknown tokenizer kind"):
        data.tokenizer_from_spec({"kind": "sentencepiece"})


@pytest.fixture
def fake_gpt2(monkeypatch, stories):
    """tiktoken.get_encoding('gpt2') replaced by a local encoding (the real one needs a download)."""
    import tiktoken
    stock = data.BPETokenizer.train(stories[100_000:], 700)._encoding
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stock)
    return stock


def test_stock_tiktoken_is_remapped_to_the_ids_used(fake_gpt2, stories):
    text = stories[:30_000]
    tok = data.build_tokenizer("token", text, tokenizer="gpt2")
    used = np.unique(fake_gpt2.encode_ordinary(text))
    assert tok.vocab_size == len(used) + 1 and tok.unk_id == len(used)
    ids = tok.encode_array(text)
    assert np.array_equal(tok.ids[ids], fake_gpt2.encode_ordinary(text)) and tok.decode(ids) == text
    other = "Xylophones! 🙂"  # stock tokens never seen in `text` become <unk>, decoded as U+FFFD
    other_ids = tok.encode(other)
    assert tok.unk_id in other_ids and "\ufffd" in tok.decode(other_ids)
    again = _respec(tok)
    assert again.spec() == tok.spec() and again.encode(text) == ids.tolist()


def test_stock_tiktoken_offline_is_a_clear_error(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Max retries exceeded\nwith url")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(MinimosaicError, match="could not load tiktoken encoding 'gpt2'.*--tokenizer bpe") as info:
        data.build_tokenizer("token", "text", tokenizer="gpt2")
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- ids and batches

def test_encode_dataset_split_dtype_and_cache(tmp_path, stories):
    tok = data.build_tokenizer("char", stories)
    train, val = data.encode_dataset(stories, tok, cache_dir=tmp_path)
    assert train.dtype == np.uint16 and len(val) == round(len(stories) * 0.1)
    assert np.array_equal(np.concatenate([train, val]), tok.encode_array(stories))  # val is the tail
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].startswith("char-") and files[0].endswith(".json")
    assert files[1] == files[0][:-5] + ".npy"  # the ids, and the record of their checksum beside them

    def no_encoding(text):
        raise AssertionError("encoded again instead of using the cache")
    tok.encode_array = no_encoding
    train2, val2 = data.encode_dataset(stories, tok, cache_dir=tmp_path)
    assert isinstance(train2, np.memmap) and np.array_equal(train2, train) and np.array_equal(val2, val)
    other = data.build_tokenizer("char", stories + "~")  # another spec: another cache entry
    data.encode_dataset(stories, other, cache_dir=tmp_path)
    assert len(os.listdir(tmp_path)) == 4


@pytest.mark.parametrize("damage", ["flip bytes", "drop the record", "truncate"])
def test_a_damaged_cache_entry_is_rebuilt_said_and_never_trained_on(tmp_path, stories, damage):
    """Flipped bytes in a cached .npy used to be trained on (and fail 10-20 steps later with 'token ids
    must lie in [0, V)'); now the entry is checked against its record, encoded again, and reported."""
    tok = data.build_tokenizer("char", stories)
    good = np.concatenate(data.encode_dataset(stories, tok, cache_dir=tmp_path))
    npy = next(tmp_path.glob("*.npy"))
    raw = bytearray(npy.read_bytes())
    if damage == "flip bytes":
        raw[-200:-100] = bytes(b ^ 0x5A for b in raw[-200:-100])
        npy.write_bytes(bytes(raw))
    elif damage == "drop the record":
        npy.with_suffix(".json").unlink()
    else:
        npy.write_bytes(bytes(raw[: len(raw) // 2]))
    notes = []
    again = np.concatenate(data.encode_dataset(stories, tok, cache_dir=tmp_path, notes=notes))
    assert np.array_equal(again, good)
    why = {"flip bytes": "does not match its checksum", "truncate": "cannot be read",
           "drop the record": "has no checksum record (an older minimosaic wrote it, or the record is damaged)"}
    assert notes == [f"the encoded-id cache {npy} {why[damage]}: encoded the text again"]
    notes = []
    data.encode_dataset(stories, tok, cache_dir=tmp_path, notes=notes)  # rewritten: trusted again
    assert notes == []


class _BigVocab(data.Tokenizer):
    vocab_size = 70_000

    def encode_array(self, text):
        return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64) + 65_000

    def spec(self):
        return {"kind": "big"}


def test_encode_dataset_uint32_and_unwritable_cache(tmp_path):
    (tmp_path / "a_file").write_text("x")
    train, val = data.encode_dataset("abcdefghij" * 10, _BigVocab(), cache_dir=tmp_path / "a_file" / "c")
    assert train.dtype == np.uint32 and train[0] == 65_000 + ord("a") and len(val) == 10


def test_split_length_errors():
    ids = np.arange(1000)
    data.check_split_lengths(ids[:900], ids[900:], block_size=99)  # exactly block_size + 1: fine
    with pytest.raises(MinimosaicError, match="validation split has 100 tokens but block_size\\+1 = 129"):
        data.check_split_lengths(ids[:900], ids[900:], block_size=128)
    with pytest.raises(MinimosaicError, match="training split has 900 tokens.*--block-size"):
        data.check_split_lengths(ids[:900], ids[900:], block_size=900)
    with pytest.raises(MinimosaicError, match="training split has 10 tokens"):
        data.BatchSampler(ids[:10], block_size=16, batch_size=2, seed=0)


def test_batches_are_shifted_windows_covering_every_offset():
    ids = np.arange(50, dtype=np.uint16)
    sampler = data.BatchSampler(ids, block_size=8, batch_size=64, seed=0)
    starts = set()
    for _ in range(20):
        x, y = sampler.next_batch()
        assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == np.int64
        assert np.array_equal(x[:, 1:], x[:, :-1] + 1) and np.array_equal(y, x + 1)
        starts.update(x[:, 0].tolist())
    assert starts == set(range(50 - 8))  # every window, the last one (y ends at ids[-1]) included


def test_sampler_state_resumes_the_same_batches():
    ids = np.random.default_rng(0).integers(0, 100, size=5000)
    run = data.BatchSampler(ids, block_size=16, batch_size=4, seed=7)
    for _ in range(5):
        run.next_batch()
    saved = json.loads(json.dumps(run.state()))
    expected = [run.next_batch() for _ in range(5)]
    resumed = data.BatchSampler(ids, block_size=16, batch_size=4, seed=999)
    resumed.load_state(saved)
    assert resumed.batches_drawn == 5
    for (x, y), (xe, ye) in zip([resumed.next_batch() for _ in range(5)], expected):
        assert np.array_equal(x, xe) and np.array_equal(y, ye)
    fresh = data.BatchSampler(ids, block_size=16, batch_size=4, seed=7)
    assert not np.array_equal(fresh.next_batch()[0], expected[0][0])


def test_eval_and_sequential_batches():
    ids = np.arange(1000)
    a, b = data.eval_batches(ids, 16, 4, n=3), data.eval_batches(ids, 16, 4, n=3)
    assert len(a) == 3 and all(np.array_equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    batches = list(data.sequential_batches(ids, block_size=16, batch_size=5))
    xs = np.concatenate([x for x, _ in batches])
    ys = np.concatenate([y for _, y in batches])
    assert xs.shape == (62, 16) and np.array_equal(xs.ravel(), ids[:62 * 16])
    assert np.array_equal(ys, xs + 1) and batches[-1][0].shape == (2, 16)
