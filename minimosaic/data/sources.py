"""Sources: where the text comes from (a local UTF-8 file, a named dataset, or the embedded stories).

A named dataset is downloaded once (sha256-checked) into the data directory: the `data_dir` argument,
else $MINIMOSAIC_DATA_DIR, else $XDG_CACHE_HOME/minimosaic, else ~/.cache/minimosaic. Nothing here
prints; errors a user can fix are `MinimosaicError`s.
"""
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..errors import MinimosaicError
from .stories import generate_stories


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
    if name == EMBEDDED:
        raise MinimosaicError(f"'{EMBEDDED}' is built in (minimosaic generates it), so there is nothing to "
                              f"download: train on it with `minimosaic train` and no --data")
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


def read_text_file(path, role="data file", advice=None):
    """The contents of a UTF-8 text file (a BOM is dropped); MinimosaicError if missing, empty, not UTF-8.
    role names the file in messages ('data file', 'prompt file'); advice replaces the data file's hint."""
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "does not exist"
        advice = advice or (f"check the path, or use a named dataset ({', '.join(DATASETS)}) or no --data "
                            f"for the embedded stories")
        raise MinimosaicError(f"{role} {path} {what}: {advice}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise MinimosaicError(f"{role} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset "
                              f"{e.start}): convert it, e.g. iconv -t UTF-8 {path.name}") from None
    if not text.strip():
        raise MinimosaicError(f"{role} {path} is empty: give a file with some text in it")
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
