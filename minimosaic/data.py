"""Text in, batches of token ids out.

Three rooms, in the order a run walks through them:

1. **Sources** (`load_text`): a local UTF-8 file, a named dataset downloaded once (sha256-checked) into
   the data directory, or the embedded "stories" corpus that minimosaic writes itself from a seed.
2. **Tokenizers** (`build_tokenizer`): characters; a byte-level BPE trained here on the text and run
   through tiktoken so encoding is fast; or a stock tiktoken encoding ('gpt2', ...) remapped to the ids
   the corpus uses. Each one describes itself with a JSON-able `spec()`, and `tokenizer_from_spec`
   rebuilds it exactly, so sampling from a checkpoint never guesses the vocabulary.
3. **Ids and batches** (`encode_dataset`, `BatchSampler`): the encoded corpus is cached as .npy (keyed by
   a hash of the text and the tokenizer spec); the LAST 10% of the ids is the validation split, the
   first 90% the training split. Batches are random windows drawn from a generator whose state is
   saved in checkpoints, so a resumed run draws exactly the batches it would have drawn.

Data directory: the `data_dir` argument, else $MINIMOSAIC_DATA_DIR, else $XDG_CACHE_HOME/minimosaic,
else ~/.cache/minimosaic. Nothing here prints; errors a user can fix are `MinimosaicError`s.
"""
import hashlib
import heapq
import json
import os
import random
import tempfile
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import MinimosaicError

VAL_FRACTION = 0.1  # the last 10% of the ids is the validation split

# ----------------------------------------------------------------------------------------------------
# 1. Sources
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A named text file downloaded once into the data directory and checked against its sha256."""
    url: str
    sha256: str
    filename: str
    description: str


DATASETS = {
    "shakespeare": Dataset(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        description="tiny Shakespeare, 1.1 MB of plays (char-rnn)"),
}
EMBEDDED = "stories"  # the generated corpus: no file, no network


def user_cache_dir():
    """$XDG_CACHE_HOME/minimosaic, else ~/.cache/minimosaic (always ours to write)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache).expanduser() / "minimosaic"


def default_data_dir():
    """$MINIMOSAIC_DATA_DIR (which may be read-only, like CI's shared data), else user_cache_dir()."""
    if os.environ.get("MINIMOSAIC_DATA_DIR"):
        return Path(os.environ["MINIMOSAIC_DATA_DIR"]).expanduser()
    return user_cache_dir()


def _data_dir(data_dir):
    return Path(data_dir).expanduser() if data_dir is not None else default_data_dir()


def _dataset(name):
    if name not in DATASETS:
        known = ", ".join([*DATASETS, EMBEDDED])
        raise MinimosaicError(f"unknown dataset {name!r}: use one of {known}, "
                              f"or give the path of a UTF-8 text file")
    return DATASETS[name]


def dataset_path(name, data_dir=None):
    """Where the named dataset lives (or will live) in the data directory."""
    return _data_dir(data_dir) / _dataset(name).filename


def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def list_datasets(data_dir=None):
    """One dict per known dataset: name, description, url, path and whether it is already cached.

    The embedded corpus is listed too, with url and path None (it is generated, never downloaded).
    """
    rows = [dict(name=EMBEDDED, description="stories minimosaic generates itself (offline, ~1.5 MB)",
                 url=None, path=None, cached=True)]
    for name, ds in DATASETS.items():
        path = dataset_path(name, data_dir)
        rows.append(dict(name=name, description=ds.description, url=ds.url, path=str(path),
                         cached=path.is_file()))
    return rows


def download_dataset(name, data_dir=None, timeout=60.0):
    """Download a named dataset into the data directory (unless a copy with the right sha256 is there).

    The bytes go to a temp file in the same directory, are checked against the sha256, then renamed
    into place (os.replace is atomic), so an interrupted download never leaves a half file behind.
    Returns the path.
    """
    ds = _dataset(name)
    path = dataset_path(name, data_dir)
    if path.is_file() and _sha256_file(path) == ds.sha256:
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{ds.filename}.", suffix=".part")
    except OSError as e:
        raise MinimosaicError(f"cannot write to data directory {path.parent} ({e.strerror or e}): "
                              f"set MINIMOSAIC_DATA_DIR to a writable directory") from None
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(ds.url, timeout=timeout) as response:
                    for block in iter(lambda: response.read(1 << 16), b""):
                        digest.update(block)
                        f.write(block)
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
                raise MinimosaicError(
                    f"could not download {name!r} from {ds.url} ({reason}): check your network, or "
                    f"download the file yourself and save it as {path}") from None
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != ds.sha256:
            raise MinimosaicError(
                f"downloaded {name!r} has sha256 {digest.hexdigest()[:16]}... but {ds.sha256[:16]}... "
                f"was expected: try again, or save a correct copy of {ds.url} as {path}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_text_file(path):
    """The contents of a UTF-8 text file (a BOM is dropped); MinimosaicError if missing, empty, not UTF-8."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        raise MinimosaicError(f"data file {path} {what}: check the path, or use a named dataset "
                              f"({', '.join(DATASETS)}) or no --data for the embedded stories")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MinimosaicError(f"data file {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                              f"{e.start}): convert it, e.g. iconv -t UTF-8 {path.name}") from None
    if not text.strip():
        raise MinimosaicError(f"data file {path} is empty: give a file with some text in it")
    return text


def load_text(source=None, data_dir=None):
    """(text, dataset_name) for a source: None or 'stories' -> the embedded corpus; a dataset name
    (see `DATASETS`) -> the cached or downloaded file; anything else -> the path of a UTF-8 text file
    (its name is the file's stem)."""
    if source is None or source == EMBEDDED:
        return generate_stories(), EMBEDDED
    source = str(source)
    if source in DATASETS and not os.path.exists(source):
        return read_text_file(download_dataset(source, data_dir)), source
    path = Path(source).expanduser()
    looks_like_a_name = not path.exists() and "." not in path.name and os.sep not in source
    if looks_like_a_name:
        _dataset(source)  # raises "unknown dataset": a bare word that is no file is meant as a name
    return read_text_file(path), path.stem


# The embedded corpus: short stories in which the names, objects and places introduced early come back
# later (who found what, where it was hidden), so a model that recalls its context predicts better.
# Everything below is written for minimosaic; no third-party text.

_NAMES = ("Mira Tom Lena Omar Ravi Sofia Ben Ada Leo Nina Hugo Ivy Kai Zoe Max Ella Finn Lily Sam Rosa "
          "Theo Maya Jack Anna Eli Ruby Noah Luna Otto Iris Felix Nora Hana Yuki Amir Lea Jonas Clara "
          "Milo Greta Pablo Emma Ivan Sara Arlo Dina Oscar Wren Tariq Elsa Rami Juno Caleb Fern Bruno "
          "Tess Kofi Pia Lars Mina Basil Olga Dev Rhea").split()
_CREATURES = ("girl boy rabbit fox bear mouse cat dog owl duck frog turtle squirrel hedgehog goat lamb "
              "robot dragon penguin otter badger pony").split()
_ADJECTIVES = ("little curious brave kind shy clever happy sleepy tiny cheerful gentle quiet busy funny "
               "careful bold").split()
_PLACES = (  # (where the story starts, how it is called later)
    ("in a small village by the river", "the village"), ("in the big green forest", "the forest"),
    ("in a house on the hill", "the house on the hill"), ("on a farm near the lake", "the farm"),
    ("in a busy town", "the town"), ("in a cabin in the woods", "the cabin"),
    ("in a town by the sea", "the town by the sea"), ("in an old castle", "the castle"),
    ("in a quiet valley", "the valley"), ("in a tree house", "the tree house"),
    ("in a sunny meadow", "the meadow"), ("by a mill on the stream", "the mill"),
    ("on a tiny island", "the island"), ("in a village in the mountains", "the mountain village"),
    ("in a garden behind the school", "the garden"))
_TRIPS = ("the market|the beach|the library|the old bridge|the park|the bakery|the top of the hill|"
          "the pond|the fair|the big barn|the lighthouse|the orchard").split("|")
_OBJECTS = ("ball kite key book hat lamp map box drum shell stone cup bell ring feather flute boat "
            "basket scarf clock compass jar brush coin spoon candle puzzle mirror whistle blanket "
            "marble button").split()
_COLORS = "red blue green yellow purple orange silver golden white black pink brown".split()
_FOUND_AT = ("by the river|near the big oak tree|under a bridge|next to the pond|behind the barn|at the "
             "market|on the beach|in the tall grass|under a pile of leaves|beside the old well").split("|")
_HIDDEN_IN = ("under the bed|in the basket|behind the door|on the top shelf|in the garden|under a tree|"
              "inside an old boot|in the kitchen|under the stairs|in a flower pot|behind the curtain|"
              "in the toy box").split("|")
_FOODS = "apples|bread and jam|warm soup|cookies|a big cake|berries|apple pie|honey|pancakes".split("|")
_ACTIVITIES = ("play a game|build a fort|read stories|sing songs|paint pictures|go fishing|plant "
               "flowers|look at the stars|fly a kite|have a picnic").split("|")
_FEELINGS = "sad|worried|surprised|upset|scared|very quiet".split("|")


def _story(rng):
    """One story. The same names and things recur, so remembering the beginning pays off at the end."""
    c = rng.choice
    a, b, d = rng.sample(_NAMES, 3)
    obj, color, (at, home), trip = c(_OBJECTS), c(_COLORS), c(_PLACES), c(_TRIPS)
    found, hid1, hid2 = c(_FOUND_AT), *rng.sample(_HIDDEN_IN, 2)
    kind_a, kind_b, kind_d = c(_CREATURES), c(_CREATURES), c(_CREATURES)
    adj_a, adj_b = c(_ADJECTIVES), c(_ADJECTIVES)
    s = [c([f"Once upon a time, there was a {adj_a} {kind_a} named {a}.",
            f"There once lived a {adj_a} {kind_a} called {a}.",
            f"Long ago, {at}, lived a {adj_a} {kind_a} named {a}.",
            f"{a} was a {adj_a} {kind_a}."]),
         c([f"{a} lived {at} with a {adj_b} {kind_b} named {b}.",
            f"{a} had a best friend, a {adj_b} {kind_b} called {b}, and they lived {at}.",
            f"{at[0].upper()}{at[1:]}, {a} and {b} the {kind_b} were the best of friends."]),
         c([f"One day, {a} found a {color} {obj} {found}.",
            f"One morning, {a} saw something shiny {found}. It was a {color} {obj}!",
            f"On a windy day, {a} was walking with {b} and found a {color} {obj} {found}."]),
         c([f"\"Look, {b}! A {color} {obj}!\" said {a}.",
            f"\"What a beautiful {obj},\" said {b}.",
            f"{b} said, \"I have never seen a {color} {obj} before.\""])]
    middle = [f"{a} and {b} went to {trip} to {c(_ACTIVITIES)}.",
              f"They ate {c(_FOODS)} and talked about the {obj}.",
              f"{b} wanted to hold the {obj}, so {a} let {b} hold it for a while.",
              f"On the way to {trip}, they met a {kind_d} named {d}. {d} asked, \"Where did you get "
              f"that {obj}?\" {a} said, \"I found it {found}.\"",
              f"It started to rain, so {a} and {b} ran back to {home}.",
              f"Back at {home}, {a} showed the {color} {obj} to everyone."]
    s += rng.sample(middle, rng.randint(2, 4))
    s += [c([f"But later, the {obj} was gone! {a} felt {c(_FEELINGS)}.",
             f"That evening, {a} could not find the {color} {obj} anywhere.",
             f"The next day, the {obj} was missing, and {b} was {c(_FEELINGS)}."]),
          f"{a} and {b} looked {hid1}, but it was not there. Then they looked {hid2}, "
          f"and there was the {color} {obj}!",
          c([f"From that day on, {a} kept the {obj} {hid1}, where {b} could see it.",
             f"{a} hugged {b}, and they played with the {obj} until the sun went down.",
             f"\"Thank you, {b}!\" said {a}. They went back to {home}, happy and tired."])]
    if rng.random() < 0.5:
        s.append(c([f"Where was the {obj}? It was {hid2}.",
                    f"Who found the {color} {obj} {found}? It was {a}.",
                    f"What did {a} find {found}? A {color} {obj}."]))
    return " ".join(s)


def generate_stories(n_chars=1_500_000, seed=0):
    """The embedded corpus: whole stories, blank-line separated, until at least `n_chars` characters.

    Deterministic for a given seed (Python's `random.Random`), ASCII only, about 0.1 s per MB.
    """
    rng = random.Random(seed)
    stories, total = [], 0
    while total < n_chars:
        stories.append(_story(rng))
        total += len(stories[-1]) + 2
    return "\n\n".join(stories) + "\n"


# ----------------------------------------------------------------------------------------------------
# 2. Tokenizers
# ----------------------------------------------------------------------------------------------------

# Splits text into chunks (words with their leading space, numbers, punctuation runs, spaces) that BPE
# never merges across; the same shape as GPT-2's pre-tokenizer.
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
BPE_SAMPLE_CHARS = 2_000_000  # BPE trains on at most the first 2 M characters (a few seconds)


class Tokenizer:
    """Text <-> ids. Subclasses set `vocab_size` and implement `encode_array`, `decode` and `spec`."""
    vocab_size: int

    def encode(self, text):
        """A list of ids."""
        return self.encode_array(text).tolist()

    def encode_array(self, text):
        """The ids as a 1-D int64 NumPy array (the fast path `encode_dataset` uses)."""
        raise NotImplementedError

    def decode(self, ids):
        raise NotImplementedError

    def spec(self):
        """A JSON-able dict from which `tokenizer_from_spec` rebuilds this exact tokenizer."""
        raise NotImplementedError


class CharTokenizer(Tokenizer):
    """One id per character; the vocabulary is the sorted set of the characters of the training text."""

    def __init__(self, chars):
        self.chars = "".join(sorted(set(chars)))
        self.vocab_size = len(self.chars)
        # code points in sorted order, so a lookup is one np.searchsorted over the whole text
        self._codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)

    @classmethod
    def from_text(cls, text):
        return cls(set(text))

    def encode_array(self, text):
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # (N,) code points
        ids = np.searchsorted(self._codes, codes)
        unknown = (ids == self.vocab_size) | (self._codes[np.minimum(ids, self.vocab_size - 1)] != codes)
        if unknown.any():
            ch = chr(codes[np.argmax(unknown)])
            raise MinimosaicError(f"character {ch!r} (U+{ord(ch):04X}) is not in this model's "
                                  f"{self.vocab_size}-character vocabulary: remove it from the text")
        return ids.astype(np.int64)

    def decode(self, ids):
        return "".join(self.chars[i] for i in np.asarray(ids).ravel().tolist())

    def spec(self):
        return {"kind": "char", "chars": self.chars}


def train_bpe(text, vocab_size, pat_str=PAT_STR, max_chars=BPE_SAMPLE_CHARS):
    """Learn byte-level BPE merges on (the first `max_chars` characters of) `text`.

    Returns the merges as a list of id pairs: merge i joins tokens (a, b) into token 256 + i, whose
    bytes are bytes(a) + bytes(b); tokens 0..255 are the single bytes. Fast because it works on counts:
    the text is split into chunks with `pat_str`, each distinct chunk is kept once with its frequency,
    and after each merge only the chunks containing the merged pair are rewritten and their pair counts
    updated. The most frequent pair comes from a heap with lazily discarded stale entries; ties go to
    the smallest pair of ids, so training is deterministic.
    """
    import regex  # a dependency of tiktoken; understands \p{L}

    chunk_counts = Counter(regex.findall(pat_str, text[:max_chars]))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]  # each chunk as a list of ids
    freqs = list(chunk_counts.values())
    token_bytes = [bytes([i]) for i in range(256)]
    token_id = {t: i for i, t in enumerate(token_bytes)}
    pair_counts = defaultdict(int)  # (a, b) -> occurrences in the text
    where = defaultdict(set)  # (a, b) -> indices of the words that contain (or once contained) it
    for w, (word, freq) in enumerate(zip(words, freqs)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += freq
            where[pair].add(w)
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(token_bytes) < vocab_size and heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_counts.get(pair, 0)
        if count != -neg_count:  # stale entry: the count went down since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, pair))
            continue
        merged = token_bytes[pair[0]] + token_bytes[pair[1]]
        new = token_id.get(merged)
        if new is None:  # two different pairs can spell the same bytes: keep one token for them
            new = token_id[merged] = len(token_bytes)
            token_bytes.append(merged)
            merges.append(pair)
        grown = set()
        for w in where.pop(pair):
            word, freq = words[w], freqs[w]
            for p in zip(word, word[1:]):
                pair_counts[p] -= freq
            words[w] = word = _merge_pair(word, pair, new)
            for p in zip(word, word[1:]):
                pair_counts[p] += freq
                where[p].add(w)
                if new in p:
                    grown.add(p)
        del pair_counts[pair]
        for p in grown:  # only pairs with the new token can have grown
            heapq.heappush(heap, (-pair_counts[p], p))
    return merges


def _merge_pair(word, pair, new):
    """`word` with every non-overlapping occurrence of `pair` (left to right) replaced by `new`."""
    a, b = pair
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _tiktoken():
    import tiktoken
    return tiktoken


class BPETokenizer(Tokenizer):
    """Byte-level BPE learned by `train_bpe`, encoded by tiktoken: ranks 0..255 are the bytes, rank
    256 + i is merge i. Every text encodes (bytes are always there) and decode(encode(t)) == t."""

    def __init__(self, merges, pat_str=PAT_STR):
        self.merges = [tuple(int(x) for x in m) for m in merges]
        self.pat_str = pat_str
        token_bytes = [bytes([i]) for i in range(256)]
        for a, b in self.merges:
            token_bytes.append(token_bytes[a] + token_bytes[b])
        self.vocab_size = len(token_bytes)
        self._encoding = _tiktoken().Encoding(
            f"minimosaic-bpe-{self.vocab_size}", pat_str=pat_str,
            mergeable_ranks={t: i for i, t in enumerate(token_bytes)}, special_tokens={})

    @classmethod
    def train(cls, text, vocab_size=1024):
        if not 256 < vocab_size <= 65536:
            raise MinimosaicError(f"BPE vocab size {vocab_size} is out of range: use 257..65536 "
                                  f"(512 to 8192 is typical)")
        return cls(train_bpe(text, vocab_size))

    def encode_array(self, text):
        return np.asarray(self._encoding.encode_ordinary(text), dtype=np.int64)

    def decode(self, ids):
        return self._encoding.decode(np.asarray(ids).ravel().tolist())

    def spec(self):
        return {"kind": "bpe", "pat_str": self.pat_str, "merges": [list(m) for m in self.merges]}


def _load_tiktoken_encoding(name):
    tiktoken = _tiktoken()
    if name not in tiktoken.list_encoding_names():
        raise MinimosaicError(f"unknown tokenizer {name!r}: use 'bpe' (trained offline on your text) or "
                              f"a tiktoken encoding: {', '.join(tiktoken.list_encoding_names())}")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # network and cache errors come in many types, all fixed the same way
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:160]
        raise MinimosaicError(f"could not load tiktoken encoding {name!r} ({reason}): tiktoken downloads it "
                              f"once, so run once with network, or use --tokenizer bpe (offline)") from None


class TiktokenTokenizer(Tokenizer):
    """A stock tiktoken encoding, remapped to the ids that occur in the training text.

    GPT-2 has 50257 tokens, most of which a small corpus never uses; keeping only the used ones keeps
    the embedding small. `ids[i]` is the stock id of our id i; stock ids never seen get `unk_id`
    (= len(ids), the last id), which decodes to U+FFFD.
    """

    def __init__(self, name, ids):
        self.name = name
        self._encoding = _load_tiktoken_encoding(name)
        self.ids = np.asarray(sorted(set(int(i) for i in ids)), dtype=np.int64)  # (V - 1,) stock ids
        self.unk_id = len(self.ids)
        self.vocab_size = len(self.ids) + 1

    @classmethod
    def from_text(cls, name, text):
        stock = np.asarray(_load_tiktoken_encoding(name).encode_ordinary(text), dtype=np.int64)
        return cls(name, np.unique(stock))

    def encode_array(self, text):
        stock = np.asarray(self._encoding.encode_ordinary(text), dtype=np.int64)
        ours = np.searchsorted(self.ids, stock)
        seen = (ours < len(self.ids)) & (self.ids[np.minimum(ours, len(self.ids) - 1)] == stock)
        return np.where(seen, ours, self.unk_id).astype(np.int64)

    def decode(self, ids):
        parts = [self._encoding.decode_single_token_bytes(int(self.ids[i])) if i != self.unk_id
                 else "\ufffd".encode() for i in np.asarray(ids).ravel().tolist()]
        return b"".join(parts).decode("utf-8", errors="replace")

    def spec(self):
        return {"kind": "tiktoken", "name": self.name, "ids": self.ids.tolist()}


def build_tokenizer(level, text, tokenizer="bpe", vocab_size=1024):
    """level 'char' -> CharTokenizer of the text; level 'token' -> BPE trained on the text with
    `vocab_size` tokens (tokenizer='bpe', offline) or a stock tiktoken encoding ('gpt2', ...)."""
    if level == "char":
        return CharTokenizer.from_text(text)
    if level != "token":
        raise MinimosaicError(f"unknown level {level!r}: use 'char' or 'token'")
    if tokenizer == "bpe":
        return BPETokenizer.train(text, vocab_size)
    return TiktokenTokenizer.from_text(tokenizer, text)


def tokenizer_from_spec(spec):
    """Rebuild a tokenizer from its `spec()` (as stored in a checkpoint)."""
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "bpe":
        return BPETokenizer(spec["merges"], spec["pat_str"])
    if kind == "tiktoken":
        return TiktokenTokenizer(spec["name"], spec["ids"])
    raise MinimosaicError(f"unknown tokenizer kind {kind!r}: this checkpoint was written by another "
                          f"minimosaic version; upgrade minimosaic")


# ----------------------------------------------------------------------------------------------------
# 3. Encoded ids and batches
# ----------------------------------------------------------------------------------------------------


def _cache_key(text, tokenizer):
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(json.dumps(tokenizer.spec(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def encode_dataset(text, tokenizer, cache_dir=None, val_fraction=VAL_FRACTION):
    """(train_ids, val_ids): the whole text encoded, the LAST `val_fraction` (10%) as validation.

    The ids are cached as `<cache_dir>/<kind>-<hash>.npy` (default cache_dir: `user_cache_dir()/encoded`,
    writable even when the data directory is read-only),
    keyed by the sha256 of the text and the tokenizer spec, so a second run loads them (memory-mapped)
    instead of tokenising again. uint16 when the vocabulary fits, else uint32. If the cache directory
    cannot be written, the ids are simply not cached.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir() / "encoded"
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    path = cache_dir / f"{tokenizer.spec()['kind']}-{_cache_key(text, tokenizer)[:32]}.npy"
    ids = None
    if path.is_file():
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError):  # a damaged cache file: encode again and overwrite it
            ids = None
    if ids is None:
        ids = tokenizer.encode_array(text).astype(dtype)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".npy.tmp")
            with os.fdopen(fd, "wb") as f:
                np.save(f, ids, allow_pickle=False)
            os.replace(tmp, path)
        except OSError:
            pass
    split = len(ids) - int(round(len(ids) * val_fraction))
    return ids[:split], ids[split:]


def check_split_lengths(train_ids, val_ids, block_size):
    """MinimosaicError unless both splits hold at least block_size + 1 tokens (one input window plus
    the target shifted by one)."""
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        _check_length(ids, block_size, split)


def _check_length(ids, block_size, split):
    if len(ids) < block_size + 1:
        raise MinimosaicError(f"{split} split has {len(ids)} tokens but block_size+1 = {block_size + 1} "
                              f"are needed: use more text or a smaller --block-size")


class BatchSampler:
    """Random windows of `block_size + 1` ids: x = window[:-1], y = window[1:], both (B, T) int64.

    The offsets come from this sampler's own PCG64 generator; `state()` / `load_state()` save and
    restore it, so a resumed run continues with exactly the batches the uninterrupted run would draw.
    """

    def __init__(self, ids, block_size, batch_size, seed=0, split="training"):
        _check_length(ids, block_size, split)
        self.ids, self.block_size, self.batch_size = ids, int(block_size), int(batch_size)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.batches_drawn = 0

    def next_batch(self):
        T = self.block_size
        starts = self.rng.integers(0, len(self.ids) - T, size=self.batch_size)  # (B,)
        windows = np.asarray(self.ids[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # (B, T+1)
        self.batches_drawn += 1
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state(self):
        """JSON-able: the generator state (Python ints, which json round-trips) and the batch count."""
        return {"bit_generator": self.rng.bit_generator.state, "batches_drawn": self.batches_drawn}

    def load_state(self, state):
        self.rng.bit_generator.state = state["bit_generator"]
        self.batches_drawn = int(state.get("batches_drawn", 0))


EVAL_SEED = 1234


def eval_batches(ids, block_size, batch_size, n, seed=EVAL_SEED, split="validation"):
    """The same `n` random batches every time (fixed seed): a low-noise comparison across steps."""
    sampler = BatchSampler(ids, block_size, batch_size, seed=seed, split=split)
    return [sampler.next_batch() for _ in range(n)]


def sequential_batches(ids, block_size, batch_size, split="validation"):
    """Back-to-back non-overlapping windows covering the ids once (the last < block_size ids are left
    out); the last batch may be smaller. For a full-coverage evaluation."""
    _check_length(ids, block_size, split)
    T = block_size
    starts = np.arange(0, len(ids) - T, T)
    for i in range(0, len(starts), batch_size):
        windows = np.asarray(ids[starts[i:i + batch_size, None] + np.arange(T + 1)], dtype=np.int64)
        yield np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])
