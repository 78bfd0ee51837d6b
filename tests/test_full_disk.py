"""A really full disk (a small tmpfs mounted for the test) never gives a traceback or loses a run: every
write the CLI makes turns the error into one line and exit code 2, a training run that cannot append
its log stops cleanly and keeps its checkpoint, and a resume leaves no half-written log behind.

Mounting needs root (as CI and the development machines run); elsewhere these tests skip with the reason.
"""
import errno
import os
import subprocess

import pytest

from minimosaic import train as trainer
from minimosaic.data import generate_stories
from minimosaic.errors import MinimosaicError
from test_cli import TINY, assert_user_error, invoke


@pytest.fixture
def disk(tmp_path):
    """A 4 MiB tmpfs, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


def fill(disk):
    """Write a file until the disk is full; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    return filler


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "stories.txt"
    path.write_text(generate_stories(n_chars=30_000, seed=3))
    return path


def train_args(text_file, out, *more):
    return ["train", "--data", text_file, *TINY, "--eval-interval", "4", "--out", out, *more]


def test_a_run_that_cannot_append_its_log_stops_cleanly_and_resumes(capsys, disk, text_file, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
    out = disk / "run"
    assert invoke(capsys, *train_args(text_file, out, "--steps", "4"))[0] == 0  # latest.npz at step 4

    class FillTheDisk(trainer.TrainLogger):
        def log(self, record):
            if record["step"] == 6:
                fill(disk)
                with open(out / "log.jsonl", "ab", buffering=0) as log:  # and the log's last block
                    try:
                        while True:
                            log.write(b"\n")  # (blank lines are skipped when the log is read)
                    except OSError:
                        pass

    model_config, config, meta = trainer.resolve_run(None, dict(data=str(text_file), out=str(out), steps=12,
                                                                log_interval=2, eval_interval=4), resume=True)
    data = trainer.prepare_data(config, resume_meta=meta)
    with pytest.raises(MinimosaicError, match=r"cannot append to .*log.jsonl \(No space left on device\): no "
                                              r"checkpoint fits either; the last good checkpoint is .*latest.npz"):
        trainer.train(model_config, config, data, resume=True, logger=FillTheDisk())
    (disk / "filler").unlink()
    code, printed, err = invoke(capsys, "train", "--out", out, "--resume", "--steps", "8")
    assert code == 0 and "done: step 8" in printed, err


def test_resuming_on_a_full_disk_is_one_line_and_leaves_no_half_log(capsys, disk, text_file, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
    out = disk / "run"
    assert invoke(capsys, *train_args(text_file, out, "--steps", "4"))[0] == 0
    with open(out / "log.jsonl", "a") as f:  # a record after the checkpoint: the resume rewrites the log
        f.write('{"step": 5, "loss": 1.0}\n')
    fill(disk)
    result = invoke(capsys, "train", "--out", out, "--resume", "--steps", "8")
    assert_user_error(result, "log.jsonl", "No space left on device")
    assert not (out / "log.tmp").exists()


@pytest.mark.parametrize("command", ["eval --per-position", "plot", "explain --heatmap HEAT -p hello"])
def test_the_reading_commands_report_a_full_disk_in_one_line(capsys, disk, text_file, tmp_path, monkeypatch,
                                                            command):
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
    out = disk / "run"
    assert invoke(capsys, *train_args(text_file, out, "--steps", "4"))[0] == 0
    for name in ("per_position.png", "per_position.csv", "loss.png"):
        (out / name).unlink(missing_ok=True)
    fill(disk)
    name, *rest = command.split()
    rest = [str(disk / "heat.png") if word == "HEAT" else word for word in rest]
    assert_user_error(invoke(capsys, name, out, *rest), "No space left on device")


def test_a_checkpoint_that_does_not_fit_says_the_disk_is_full(capsys, disk, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
    out = disk / "run"
    assert invoke(capsys, *train_args(text_file, out, "--steps", "4"))[0] == 0
    fill(disk)
    result = invoke(capsys, "train", "--out", out, "--resume", "--steps", "12", "--eval-interval", "4",
                    "--log-interval", "100")
    assert_user_error(result, "cannot write checkpoint", "(No space left on device): free some space on that "
                      "disk, or give --out on another one")
