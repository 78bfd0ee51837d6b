"""Ids and batches: the encoded corpus (cached as .npy), its splits, and the batches drawn from them.

The encoded ids are cached keyed by a hash of the text and the tokenizer spec; the LAST 10% of the ids
is the validation split, the first 90% the training split. Batches are random windows drawn from a
generator whose state is saved in checkpoints, so a resumed run draws exactly the batches it would
have drawn.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import MinimosaicError
from .sources import user_cache_dir

VAL_FRACTION = 0.1  # the last 10% of the ids is the validation split


def _cache_key(text, tokenizer):
    digest = hashlib.sha256(text.encode("utf-8"))
    digest.update(json.dumps(tokenizer.spec(), sort_keys=True).encode("utf-8"))
    return digest.hexdigest()


def _ids_digest(ids):
    return hashlib.sha256(np.ascontiguousarray(ids).tobytes()).hexdigest()


def _load_cached(path, vocab_size):
    """(ids, None) if the cached ids at `path` are what was saved (their sha256 and length match the
    record beside them, and every id is in the vocabulary), else (None, why not)."""
    try:
        record = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None, "has no checksum record (an older minimosaic wrote it, or the record is damaged)"
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None, "cannot be read"
    if (record.get("length") != len(ids) or record.get("sha256") != _ids_digest(ids)
            or (len(ids) and int(ids.max()) >= vocab_size)):
        return None, "does not match its checksum"
    return ids, None


def encode_dataset(text, tokenizer, cache_dir=None, val_fraction=VAL_FRACTION, notes=None):
    """(train_ids, val_ids): the whole text encoded, the LAST `val_fraction` (10%) as validation.

    The ids are cached as `<cache_dir>/<kind>-<hash>.npy` (default cache_dir: `user_cache_dir()/encoded`,
    writable even when the data directory is read-only), keyed by the sha256 of the text and the
    tokenizer spec, so a second run loads them (memory-mapped) instead of tokenising again, with a
    record beside them (`.json`: their sha256 and length). An entry that does not match its record is
    never trained on: it is encoded again and rewritten, and a line saying so is appended to `notes`.
    uint16 when the vocabulary fits, else uint32. If the cache directory cannot be written, the ids are
    simply not cached.
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else user_cache_dir() / "encoded"
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    path = cache_dir / f"{tokenizer.spec()['kind']}-{_cache_key(text, tokenizer)[:32]}.npy"
    ids = None
    if path.is_file():
        ids, why_not = _load_cached(path, tokenizer.vocab_size)
        if ids is None and notes is not None:
            notes.append(f"the encoded-id cache {path} {why_not}: encoded the text again")
    if ids is None:
        ids = tokenizer.encode_array(text).astype(dtype)
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            for target, write in ((path, lambda f: np.save(f, ids, allow_pickle=False)),
                                  (path.with_suffix(".json"), lambda f: f.write(json.dumps(
                                      {"sha256": _ids_digest(ids), "length": len(ids)}).encode()))):
                fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    write(f)
                os.replace(tmp, target)
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
