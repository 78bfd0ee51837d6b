"""Tokenizers: text <-> ids, and the JSON-able spec that rebuilds each one exactly.

Characters (`CharTokenizer`); a byte-level BPE trained here on the text (`train_bpe`) and run through
tiktoken so encoding is fast (`BPETokenizer`); or a stock tiktoken encoding ('gpt2', ...) remapped to
the ids the corpus uses (`TiktokenTokenizer`). `build_tokenizer` makes one for a text;
`tokenizer_from_spec` rebuilds one from its `spec()`, so sampling from a checkpoint never guesses the
vocabulary.
"""
import heapq
from collections import Counter, defaultdict

import numpy as np

from ..errors import MinimosaicError


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
