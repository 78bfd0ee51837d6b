"""Checkpoints: exact round trips, damaged files detected, atomic writes, clear errors."""
import json
import os

import numpy as np
import pytest

from minimosaic import checkpoint
from minimosaic.checkpoint import load_checkpoint, save_checkpoint
from minimosaic.errors import MinimosaicError


@pytest.fixture
def arrays():
    rng = np.random.default_rng(0)
    return {"blocks.0.attn.weight": rng.standard_normal((64, 48)).astype(np.float32),
            "opt.m.blocks.0.attn.weight": rng.standard_normal((64, 48)),  # float64
            "tokens": rng.integers(0, 60_000, size=100).astype(np.uint16),
            "step": np.array(17, dtype=np.int64),  # 0-d
            "mask": rng.random((3, 5)) < 0.5,
            "empty": np.zeros((0, 4), dtype=np.float32),
            "file": np.arange(6, dtype=np.int32).reshape(2, 3)}  # would clash with np.savez's keywords


@pytest.fixture
def meta():
    rng_state = np.random.Generator(np.random.PCG64(5)).bit_generator.state  # 128-bit Python ints
    return {"config": {"model": "mosaic", "n_embd": 64, "pmem_size": None},
            "tokenizer": {"kind": "char", "chars": "\n !abcé🙂"},
            "step": 1200, "best_val_loss": float("inf"), "last_loss": np.float32(1.25),
            "rng": rng_state, "data": {"batches_drawn": 1200}}


def test_round_trip_keeps_dtypes_shapes_values_and_meta(tmp_path, arrays, meta):
    path = save_checkpoint(tmp_path / "run", "latest", arrays, meta)
    assert path == tmp_path / "run" / "latest.npz" and os.listdir(tmp_path / "run") == ["latest.npz"]
    loaded, loaded_meta = load_checkpoint(tmp_path / "run", "latest")
    assert loaded.keys() == arrays.keys()
    for key, array in arrays.items():
        assert loaded[key].dtype == array.dtype and loaded[key].shape == array.shape
        assert np.array_equal(loaded[key], array)
    expected = json.loads(json.dumps({**meta, "last_loss": 1.25}))
    assert loaded_meta == expected and loaded_meta["rng"] == meta["rng"]
    assert load_checkpoint(tmp_path / "run", "latest.npz")[1] == expected


def test_file_is_a_plain_npz_without_pickles(tmp_path, arrays, meta):
    path = save_checkpoint(tmp_path, "c", arrays, meta)
    with np.load(path, allow_pickle=False) as npz:
        assert set(npz.files) == {*arrays, "__meta__"}
        header = json.loads(npz["__meta__"].tobytes())
    assert header["format_version"] == checkpoint.FORMAT_VERSION and header["meta"]["step"] == 1200
    with pytest.raises(ValueError, match="object"):
        save_checkpoint(tmp_path, "d", {"bad": np.array([{}, None], dtype=object)}, {})
    with pytest.raises(ValueError, match="name"):
        save_checkpoint(tmp_path, "d", {"__meta__": np.zeros(2)}, {})


def test_overwrite_replaces_the_old_checkpoint(tmp_path, arrays, meta):
    save_checkpoint(tmp_path, "c", arrays, meta)
    save_checkpoint(tmp_path, "c", {"w": np.ones(3)}, {"step": 2})
    loaded, loaded_meta = load_checkpoint(tmp_path, "c")
    assert list(loaded) == ["w"] and loaded_meta == {"step": 2}
    assert os.listdir(tmp_path) == ["c.npz"]


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.9, 0.999])
def test_truncated_file_is_detected(tmp_path, arrays, meta, keep):
    path = save_checkpoint(tmp_path, "c", arrays, meta)
    raw = path.read_bytes()
    path.write_bytes(raw[:int(len(raw) * keep)] if keep else raw[:-1])
    with pytest.raises(MinimosaicError, match="corrupt or truncated.*previous good one") as info:
        load_checkpoint(tmp_path, "c")
    assert "\n" not in str(info.value)


def test_flipped_bytes_in_arrays_or_header_are_detected(tmp_path, arrays, meta):
    path = save_checkpoint(tmp_path, "c", arrays, meta)
    raw = path.read_bytes()
    weight = arrays["blocks.0.attn.weight"].tobytes()
    targets = [raw.find(weight) + 1000,  # inside a float32 parameter
               raw.find(arrays["opt.m.blocks.0.attn.weight"].tobytes()) + 7,  # inside a moment
               raw.find(b'"step": 1200') + 9]  # a digit of the JSON meta
    assert min(targets) > 100
    for position in targets:
        damaged = bytearray(raw)
        damaged[position] ^= 0x10
        path.write_bytes(bytes(damaged))
        with pytest.raises(MinimosaicError, match="corrupt or truncated"):
            load_checkpoint(tmp_path, "c")


def test_a_write_interrupted_midway_leaves_the_previous_checkpoint(tmp_path, arrays, meta, monkeypatch):
    save_checkpoint(tmp_path, "c", arrays, meta)
    before = (tmp_path / "c.npz").read_bytes()
    real_write_array = np.lib.format.write_array
    calls = []

    def crash_on_third_array(fp, array, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            fp.write(b"half an array")
            raise KeyboardInterrupt  # e.g. Ctrl-C while saving
        return real_write_array(fp, array, **kwargs)

    monkeypatch.setattr(np.lib.format, "write_array", crash_on_third_array)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, "c", {k: v + 1 for k, v in arrays.items() if v.dtype != bool}, {"step": 2})
    assert len(calls) == 3
    assert os.listdir(tmp_path) == ["c.npz"]  # the temp file is gone
    assert (tmp_path / "c.npz").read_bytes() == before
    monkeypatch.undo()
    assert load_checkpoint(tmp_path, "c")[1]["step"] == 1200


def test_missing_checkpoint_and_unwritable_directory(tmp_path):
    with pytest.raises(MinimosaicError, match="does not exist"):
        load_checkpoint(tmp_path, "nothing")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(MinimosaicError, match="cannot write checkpoint.*writable"):
        save_checkpoint(tmp_path / "a_file" / "run", "c", {"w": np.ones(2)}, {})


def test_unknown_format_version_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 2)
    save_checkpoint(tmp_path, "future", {"w": np.ones(2)}, {})
    monkeypatch.undo()
    with pytest.raises(MinimosaicError, match="format_version 2 but this minimosaic reads version 1"):
        load_checkpoint(tmp_path, "future")


def test_checkpoints_take_the_umask_mode_like_any_file(tmp_path):
    """mkstemp makes its temp file 0600; the checkpoint it becomes gets the ordinary 0666 & ~umask."""
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path, "latest", {"w": np.zeros(3, np.float32)}, {"step": 1})
    finally:
        os.umask(old)
    assert (os.stat(path).st_mode & 0o777) == 0o644
