"""Checkpoints: named host arrays plus a JSON header, in one .npz file, written atomically.

Layout of `<directory>/<name>.npz` (a plain zip that `np.load` opens, never pickled):
- one `<array name>.npy` member per array (parameters, optimizer moments, ...: whatever the trainer
  passes in, as NumPy arrays);
- `__meta__.npy`: the UTF-8 bytes of a JSON header, as a uint8 array:
  {"format_version": 1, "arrays": {name: {"dtype", "shape", "sha256"}}, "meta": <the caller's meta>}.

The sha256 of every array's bytes is checked on load, and the zip's own CRCs cover the header, so a
truncated or damaged file is reported, never loaded. Writing goes to a temp file in the same directory,
is flushed and fsync'ed, then renamed over the old file with os.replace (atomic), so a crash mid-write
leaves the previous checkpoint as it was.
"""
import errno
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from .errors import MinimosaicError

FORMAT_VERSION = 1
_META = "__meta__"


def checkpoint_path(directory, name):
    """`<directory>/<name>.npz` (a trailing .npz in `name` is accepted)."""
    name = str(name)
    return Path(directory).expanduser() / (name if name.endswith(".npz") else f"{name}.npz")


def _sha256(array):
    return hashlib.sha256(np.ascontiguousarray(array).data).hexdigest()


def _json_default(value):
    """Let NumPy scalars and small arrays in meta (a float32 loss, an int64 step) become JSON."""
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    raise TypeError(f"checkpoint meta holds a {type(value).__name__}, which JSON cannot store")


def _write_npz(f, arrays, header_bytes):
    """What np.savez does, minus its keyword arguments (an array named 'file' would clash with them)."""
    with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for key, array in [*arrays.items(), (_META, np.frombuffer(header_bytes, dtype=np.uint8))]:
            with zf.open(f"{key}.npy", mode="w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def save_checkpoint(directory, name, arrays, meta):
    """Write `arrays` (dict name -> NumPy array) and JSON-able `meta` to `<directory>/<name>.npz`.

    Returns the path. The directory is created if needed; MinimosaicError if it cannot be written.
    """
    arrays = {str(k): np.asarray(v) for k, v in arrays.items()}
    for key, array in arrays.items():
        if "/" in key or key.startswith("__") or not key:
            raise ValueError(f"array name {key!r}: names must be non-empty, without '/', not start with '__'")
        if array.dtype.hasobject:
            raise ValueError(f"array {key!r} has dtype object, which cannot be saved without pickle")
    header = {"format_version": FORMAT_VERSION,
              "arrays": {k: {"dtype": a.dtype.str, "shape": list(a.shape), "sha256": _sha256(a)}
                         for k, a in arrays.items()},
              "meta": meta}
    header_bytes = json.dumps(header, default=_json_default).encode("utf-8")
    path = checkpoint_path(directory, name)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            _write_npz(f, arrays, header_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        os.replace(tmp, path)
        tmp = None
        _fsync_directory(path.parent)  # makes the rename itself survive a power cut
    except OSError as e:
        advice = ("free some space on that disk, or give --out on another one" if e.errno == errno.ENOSPC
                  else "choose a writable output directory")
        raise MinimosaicError(f"cannot write checkpoint {path} ({e.strerror or e}): {advice}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory):
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on some systems (Windows): the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(directory, name):
    """(arrays, meta) from `<directory>/<name>.npz`, after checking format version and checksums.

    MinimosaicError if the file is missing, truncated or corrupt, or of another format version.
    """
    path = checkpoint_path(directory, name)
    if not path.is_file():
        raise MinimosaicError(f"checkpoint {path} does not exist: check the directory and name "
                              f"(train first, or pass the run's output directory)")

    def corrupt(why):
        return MinimosaicError(f"checkpoint {path} is corrupt or truncated ({why}); "
                               f"the previous good one, if any, is untouched")

    try:
        with np.load(path, allow_pickle=False) as npz:
            header = json.loads(npz[_META].tobytes().decode("utf-8"))
            version = header.get("format_version")
            if version != FORMAT_VERSION:
                raise MinimosaicError(f"checkpoint {path} has format_version {version} but this minimosaic "
                                      f"reads version {FORMAT_VERSION}: use a matching minimosaic version")
            expected = header["arrays"]
            found = set(npz.files) - {_META}
            if found != set(expected):
                raise corrupt(f"arrays {sorted(found ^ set(expected))[:3]} do not match its header")
            arrays = {}
            for key, info in expected.items():
                array = npz[key]
                if (array.dtype.str != info["dtype"] or list(array.shape) != info["shape"]
                        or _sha256(array) != info["sha256"]):
                    raise corrupt(f"array {key!r} does not match its checksum")
                arrays[key] = array
    except MinimosaicError:
        raise
    except (OSError, ValueError, EOFError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        # UnicodeDecodeError and JSONDecodeError are ValueErrors; a bad zip raises any of these
        raise corrupt(" ".join(f"{type(e).__name__}: {e}".split())[:120]) from None
    return arrays, header["meta"]
