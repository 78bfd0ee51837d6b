"""The command line: every command on a tiny run, and every user mistake -> one line, exit code 2."""
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_user_error, invoke

from minimosaic import backend, cli
from minimosaic.data import generate_stories

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--pmem-size", "16",
        "--batch-size", "4", "--eval-batches", "2", "--warmup", "2", "--log-interval", "2"]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "stories.txt"
    path.write_text(generate_stories(n_chars=30_000, seed=3))
    return path


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, text_file):
    """A tiny trained run shared by the sample / eval / explain / plot tests."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIMOSAIC_DATA_DIR", str(out.parent / "data"))
        with pytest.raises(SystemExit) as done:
            cli.main(["train", "--data", str(text_file), *TINY, "--steps", "6", "--eval-interval", "3",
                      "--out", str(out)])
    assert done.value.code == 0
    return out


def test_train_writes_checkpoints_log_and_plot(trained, capsys):
    for name in ("latest.npz", "best.npz", "log.jsonl", "loss.png"):
        assert (trained / name).is_file(), name
    code, out, err = invoke(capsys, "plot", trained, "--out", trained / "again.png")
    assert code == 0 and (trained / "again.png").stat().st_size > 1000


def test_train_prints_config_and_parameter_count(text_file, tmp_path, data_dir, capsys):
    code, out, err = invoke(capsys, "train", "--data", text_file, *TINY, "--steps", "2",
                            "--eval-interval", "2", "--out", tmp_path / "r", "--model", "gpt")
    assert code == 0, err
    assert "model    gpt: n_layer 1 n_head 2 n_embd 16" in out and "parameters" in out
    assert "step      2/2" in out and "val_loss" in out and "done: step 2" in out


def test_resume_continues_and_refuses_other_settings(text_file, tmp_path, data_dir, capsys):
    run = ["train", "--data", text_file, *TINY, "--eval-interval", "2", "--out", tmp_path / "r"]
    assert invoke(capsys, *run, "--steps", "2")[0] == 0
    # without --resume the folder is not overwritten
    assert_user_error(invoke(capsys, *run, "--steps", "2"), "already holds a run", "--resume")
    # settings not given on resume come from the checkpoint; more steps may be asked
    code, out, err = invoke(capsys, "train", "--out", tmp_path / "r", "--resume", "--steps", "4")
    assert code == 0, err
    assert "resuming at step 2" in out and "done: step 4" in out
    assert_user_error(invoke(capsys, "train", "--out", tmp_path / "r", "--resume", "--n-layer", "2"),
                      "cannot resume", "n_layer 1 in the checkpoint, 2 asked")
    assert_user_error(invoke(capsys, "train", "--out", tmp_path / "r", "--resume", "--model", "gpt"),
                      "cannot resume", "model 'mosaic' in the checkpoint, 'gpt' asked")
    assert_user_error(invoke(capsys, "train", "--out", tmp_path / "r", "--resume", "--level", "token",
                             "--vocab-size", "300"), "cannot resume", "level 'char'", "vocab_size 1024")
    assert_user_error(invoke(capsys, "train", "--out", tmp_path / "none", "--resume"), "does not exist")


def test_ctrl_c_saves_the_run_and_says_how_to_resume(text_file, tmp_path, data_dir, capsys, monkeypatch):
    import os
    import signal
    log = cli.ConsoleLogger.log

    def log_then_press_ctrl_c(self, record):
        log(self, record)
        if record["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(cli.ConsoleLogger, "log", log_then_press_ctrl_c)
    run = ["train", "--data", text_file, *TINY, "--steps", "6", "--eval-interval", "4",
           "--out", tmp_path / "r"]
    code, out, err = invoke(capsys, *run)
    assert code == 130 and "interrupted at step 2" in out and "--resume" in out
    monkeypatch.setattr(cli.ConsoleLogger, "log", log)
    code, out, err = invoke(capsys, *run, "--resume")
    assert code == 0 and "resuming at step 2" in out and "done: step 6" in out


def test_sample_generates_from_the_prompt(trained, capsys):
    code, out, err = invoke(capsys, "sample", trained, "--prompt", "Once upon", "--max-new-tokens", "20",
                            "--num-samples", "2", "--top-k", "5")
    assert code == 0, err
    samples = out.split("-" * 60)
    assert len(samples) == 2 and all(s.strip().startswith("Once upon") for s in samples)
    again = invoke(capsys, "sample", trained, "--prompt", "Once upon", "--max-new-tokens", "20",
                   "--num-samples", "2", "--top-k", "5")[1]
    assert again == out  # seeded
    prompt = trained.parent / "prompt.txt"
    prompt.write_text("Mira")
    code, out, err = invoke(capsys, "sample", trained, "--prompt-file", prompt, "--max-new-tokens", "5",
                            "--checkpoint", "latest")
    assert code == 0 and out.startswith("Mira")
    code, out, err = invoke(capsys, "sample", trained, "--max-new-tokens", "5", "--temperature", "0")
    assert code == 0 and len(out) >= 5  # no prompt: starts from a newline; temperature 0 is greedy


def test_eval_reports_loss_and_writes_per_position(trained, capsys):
    code, out, err = invoke(capsys, "eval", trained, "--per-position", "--max-batches", "3")
    assert code == 0, err
    assert "perplexity" in out and "bits per character" in out
    rows = (trained / "per_position.csv").read_text().splitlines()
    assert rows[0] == "position,loss" and len(rows) == 1 + 16
    assert (trained / "per_position.png").stat().st_size > 1000


def test_eval_context_reads_past_the_training_block_where_the_model_allows_it(trained, capsys):
    """The mosaic (no positions) evaluates windows 2x its block size, loss at every position."""
    code, out, err = invoke(capsys, "eval", trained, "--context", "32", "--per-position", "--max-batches", "2")
    assert code == 0, err
    assert "windows of 32 tokens (trained on 16)" in out and "perplexity" in out
    rows = (trained / "per_position.csv").read_text().splitlines()
    assert len(rows) == 1 + 32 and all(float(r.split(",")[1]) > 0 for r in rows[1:])


def test_eval_context_past_a_gpts_learned_positions_is_one_line(text_file, tmp_path, data_dir, capsys):
    """A GPT with learned positions stops at block_size: one line naming the maximum and why, exit 2;
    the same GPT trained with --no-position-embedding (NoPE) reads the longer windows."""
    for extra, name in (([], "gpt"), (["--no-position-embedding"], "nope")):
        code, out, err = invoke(capsys, "train", "--data", text_file, *TINY, "--steps", "2", "--eval-interval",
                                "2", "--model", "gpt", *extra, "--out", tmp_path / name)
        assert code == 0, err
    assert "no position embedding" in out
    assert_user_error(invoke(capsys, "eval", tmp_path / "gpt", "--context", "17"),
                      "--context 17", "at most 16 tokens", "position embeddings for positions 0-15",
                      "--no-position-embedding")
    code, out, err = invoke(capsys, "eval", tmp_path / "gpt", "--context", "16", "--max-batches", "1")
    assert code == 0, err
    code, out, err = invoke(capsys, "eval", tmp_path / "nope", "--context", "64", "--max-batches", "1")
    assert code == 0 and "windows of 64 tokens (trained on 16)" in out, err


def test_explain_shows_retrievals_and_writes_a_heatmap(trained, capsys):
    code, out, err = invoke(capsys, "explain", trained, "--prompt", "Mira and Tom", "--top", "2",
                            "--heatmap", trained / "heat.png")
    assert code == 0, err
    assert "layer 0" in out and "head 1" in out and "slots" in out
    assert (trained / "heat.png").stat().st_size > 1000
    assert_user_error(invoke(capsys, "explain", trained, "--prompt", "Mira", "--layer", "5"), "--layer 5")


def test_data_lists_datasets(data_dir, capsys):
    code, out, err = invoke(capsys, "data")
    assert code == 0 and "shakespeare" in out and "stories" in out and str(data_dir) in out
    assert invoke(capsys, "data", "list")[1] == out
    assert_user_error(invoke(capsys, "data", "download", "nope"), "unknown dataset 'nope'")


def test_every_help_shows_defaults(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # at 80 columns rich cuts the longest default short (with an ellipsis)
    for command in ("train", "sample", "eval", "explain", "plot", "data"):
        code, out, err = invoke(capsys, command, "--help")
        assert code == 0 and "Usage" in out, command
    out = invoke(capsys, "train", "--help")[1]
    for fragment in ("from --preset", "char-tiny", "runs/<model>-<level>-<data>", "mosaic|gpt"):
        assert fragment in out, fragment
    assert "[default: 500]" in invoke(capsys, "sample", "--help")[1]


def test_console_script_and_root_cli_py_are_the_same_app():
    root = Path(__file__).resolve().parents[1]
    commands = [[sys.executable, str(root / "cli.py")]]
    if shutil.which("minimosaic"):
        commands.append([shutil.which("minimosaic")])
    for command in commands:
        done = subprocess.run([*command, "version"], capture_output=True, text=True, cwd=root)
        assert done.returncode == 0 and done.stdout.strip() == cli.__version__, done.stderr
        done = subprocess.run([*command, "train", "--n-head", "x"], capture_output=True, text=True, cwd=root)
        assert done.returncode == 2 and done.stderr.count("\n") == 1 and "--n-head" in done.stderr


# ---------------------------------------------------------------------------------------------------
# user mistakes: one line on stderr, exit code 2, no traceback

def train_args(tmp_path, *extra):
    return ["train", *TINY, "--steps", "1", "--out", tmp_path / "run", *extra]


def test_missing_data_file(tmp_path, data_dir, capsys):
    missing = tmp_path / "nope.txt"
    assert_user_error(invoke(capsys, *train_args(tmp_path, "--data", missing)), "does not exist")


def test_empty_data_file(tmp_path, data_dir, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(invoke(capsys, *train_args(tmp_path, "--data", tmp_path / "empty.txt")), "is empty")


def test_non_utf8_data_file(tmp_path, data_dir, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 100)
    assert_user_error(invoke(capsys, *train_args(tmp_path, "--data", tmp_path / "latin1.txt")), "not UTF-8")


def test_text_shorter_than_a_block(tmp_path, data_dir, capsys):
    (tmp_path / "short.txt").write_text("hello world " * 10)
    assert_user_error(invoke(capsys, *train_args(tmp_path, "--data", tmp_path / "short.txt")),
                      "validation split has", "--block-size")


def test_n_embd_not_divisible_by_n_head(tmp_path, text_file, data_dir, capsys):
    assert_user_error(invoke(capsys, *train_args(tmp_path, "--data", text_file, "--n-head", "3")),
                      "not divisible")


def test_unknown_preset_and_option_values(tmp_path, capsys):
    assert_user_error(invoke(capsys, "train", "--preset", "huge"), "unknown preset 'huge'", "char-small")
    assert_user_error(invoke(capsys, "train", "--model", "lstm"), "--model")
    assert_user_error(invoke(capsys, "train", "--steps", "many"), "--steps")
    assert_user_error(invoke(capsys, "train", "--no-such-option"), "--no-such-option")
    assert_user_error(invoke(capsys, "train", "--device", "tpu", "--out", tmp_path / "r"),
                      "unknown device 'tpu'")
    assert_user_error(invoke(capsys, "nonsense"), "nonsense")
    assert_user_error(invoke(capsys, "train", "--vocab-size", "500"), "--level token")


def test_corrupt_checkpoint_is_detected_and_the_other_one_still_loads(trained, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    best = run / "best.npz"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    assert_user_error(invoke(capsys, "sample", run, "--max-new-tokens", "3"), "corrupt or truncated")
    code, out, err = invoke(capsys, "sample", run, "--max-new-tokens", "3", "--checkpoint", "latest")
    assert code == 0, err
    latest = run / "latest.npz"
    raw = bytearray(latest.read_bytes())
    with np.load(latest) as npz:
        weights = npz["model.token_embedding.weight"].tobytes()
    assert raw.find(weights) > 0
    raw[raw.find(weights) + len(weights) // 2] ^= 0x10  # one flipped bit in the middle of the weights
    latest.write_bytes(bytes(raw))
    assert_user_error(invoke(capsys, "train", "--out", run, "--resume", "--steps", "8"), "corrupt")


@pytest.mark.skipif(backend.gpu_available(), reason="a GPU is available here")
def test_gpu_without_cupy(tmp_path, text_file, data_dir, capsys):
    assert_user_error(invoke(capsys, *train_args(tmp_path, "--data", text_file, "--device", "gpu")),
                      "--device gpu")


def test_unwritable_out(tmp_path, text_file, data_dir, capsys):
    (tmp_path / "file").write_text("")
    assert_user_error(invoke(capsys, "train", "--data", text_file, *TINY, "--out", tmp_path / "file" / "run"),
                      "cannot write to output folder")


@pytest.mark.parametrize("plain", [False, True], ids=["default", "plain"])
def test_commands_run_on_the_fast_layer_unless_plain(capsys, text_file, data_dir, tmp_path, plain, trained,
                                                     monkeypatch):
    """train says which core it runs on; sample turns the fast layer on unless --plain (or
    MINIMOSAIC_PLAIN=1); both give the same text from the same seed."""
    from minimosaic import fast, registry
    flag = ["--plain"] if plain else []
    code, out, err = invoke(capsys, "train", "--data", text_file, *TINY, "--steps", "2", "--eval-interval", "2",
                            "--out", tmp_path / "run", *flag)
    assert code == 0, err
    assert ("(plain core)" if plain else "(fast layer)") in out
    registry.clear()
    code, out, _ = invoke(capsys, "sample", trained, "--max-new-tokens", "20", "--seed", "1", *flag)
    assert code == 0 and fast.is_enabled() == (not plain)
    registry.clear()
    monkeypatch.setenv("MINIMOSAIC_PLAIN", "1")
    code, plain_out, _ = invoke(capsys, "sample", trained, "--max-new-tokens", "20", "--seed", "1")
    assert code == 0 and not fast.is_enabled() and plain_out == out


# ---------------------------------------------------------------- messages that say what is true
def test_no_arguments_prints_the_help_once(capsys):
    code, out, err = invoke(capsys)
    assert code == 0 and out.count("Usage:") == 1 and not err


def test_the_train_entry_of_the_command_list_is_a_whole_sentence(capsys):
    code, out, _ = invoke(capsys, "--help")
    line = next(line for line in out.splitlines() if " train " in line)
    assert code == 0 and "preset:" not in out.split(" sample ")[0] and "checkpoints" in line


def test_defaults_are_shown_plainly(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = invoke(capsys, "train", "--help")
    assert "[default: mosaic]" in out and "[default: (" not in out and "[default: char]" in out
    _, out, _ = invoke(capsys, "bench", "--help")
    assert "[default: NumPy's]" in out


def test_downloading_the_built_in_stories_says_they_are_built_in(capsys, data_dir):
    assert invoke(capsys, "data", "download", "stories")[2].strip() == (
        "error: 'stories' is built in (minimosaic generates it), so there is nothing to download: train on "
        "it with `minimosaic train` and no --data")


def test_an_unknown_checkpoint_name_is_named(capsys, trained):
    assert invoke(capsys, "sample", trained, "--checkpoint", "foo")[2].strip() == (
        "error: unknown checkpoint 'foo': use --checkpoint best or --checkpoint latest")


def test_a_missing_prompt_file_is_called_a_prompt_file(capsys, trained, tmp_path):
    missing = tmp_path / "nope.txt"
    assert invoke(capsys, "sample", trained, "--prompt-file", missing)[2].strip() == (
        f"error: prompt file {missing} does not exist: check the --prompt-file path")


def test_resuming_on_another_text_says_the_text_changed(capsys, text_file, data_dir, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(text_file.read_text().replace("a", "ã"))
    out = tmp_path / "run"
    assert invoke(capsys, "train", "--data", text_file, *TINY, "--steps", "2", "--eval-interval", "2",
                  "--out", out)[0] == 0
    result = invoke(capsys, "train", "--data", other, "--out", out, "--resume", "--steps", "4")
    assert_user_error(result, "the training text changed", "'stories' in the checkpoint, 'other' now")


def test_a_time_limited_run_says_so_and_each_resume_gets_a_fresh_budget(capsys, text_file, data_dir, tmp_path):
    """--time-limit is per invocation: a resumed run trains for its own budget, not one step."""
    out = tmp_path / "timed"
    args = ["train", "--data", text_file, *TINY, "--steps", "100000", "--eval-interval", "100000", "--out", out]
    code, first, _ = invoke(capsys, *args, "--time-limit", "1")
    assert code == 0 and "stopped at the time limit (1 s of training) at step" in first
    first_step = int(first.split("at step ")[-1].split()[0])
    code, second, _ = invoke(capsys, *args, "--time-limit", "1", "--resume")
    second_step = int(second.split("at step ")[-1].split()[0])
    assert code == 0 and "stopped at the time limit" in second and second_step > first_step + 5


def test_resuming_a_finished_run_says_there_is_nothing_to_do(capsys, text_file, data_dir, tmp_path):
    out = tmp_path / "done"
    args = ["train", "--data", text_file, *TINY, "--steps", "2", "--eval-interval", "2", "--out", out]
    assert invoke(capsys, *args)[0] == 0
    code, printed, _ = invoke(capsys, *args, "--resume")
    assert code == 0 and printed.strip().splitlines()[-1] == (
        "nothing to do: run finished at step 2; raise --steps to continue")


NUMERIC_MISTAKES = [  # (command, its arguments before the option, option, a value it must refuse)
    ("eval", "RUN", "--max-batches", "0"), ("eval", "RUN", "--context", "0"), ("eval", "RUN", "--max-batches", "-1"), ("eval", "RUN", "--batch-size", "0"),
    ("explain", "RUN -p hi", "--top", "-2"), ("explain", "RUN -p hi", "--top", "0"),
    ("sample", "RUN", "--max-new-tokens", "-1"), ("sample", "RUN", "--num-samples", "0"),
    ("sample", "RUN", "--top-k", "0"), ("sample", "RUN", "--temperature", "-0.5"),
    ("bench", "", "--steps", "0"), ("bench", "", "--warmup", "-1"), ("bench", "", "--threads", "0"),
    ("bench", "", "--gen-context", "1"), ("train", "", "--seed", "-1"), ("train", "", "--steps", "0"),
    ("train", "", "--batch-size", "0"), ("train", "", "--n-layer", "0"), ("train", "", "--dropout", "1.5"),
]


@pytest.mark.parametrize("command, before, option, value", NUMERIC_MISTAKES,
                         ids=[f"{c}{o}={v}" for c, _, o, v in NUMERIC_MISTAKES])
def test_every_numeric_option_refuses_a_value_that_cannot_work(capsys, trained, data_dir, tmp_path,
                                                               command, before, option, value):
    """One line naming the option, exit code 2, and no fake result (eval --max-batches 0 printed
    'loss 0.0000 | perplexity 1.000' with exit 0)."""
    args = [trained if word == "RUN" else word for word in before.split()]
    extra = ["--out", tmp_path / "never"] if command == "train" else []
    code, out, err = invoke(capsys, command, *args, option, value, *extra)
    name = option.lstrip("-")
    assert_user_error((code, out, err), )
    assert option in err or name in err or name.replace("-", "_") in err, err
    assert "loss" not in out and not (tmp_path / "never" / "latest.npz").exists()


def test_a_second_run_on_a_folder_in_use_is_refused_and_kill_9_leaves_no_stale_lock(
        capsys, text_file, data_dir, tmp_path):
    """Two trainings into one --out: the second exits 2 naming the first's PID (it used to overwrite the
    first's checkpoints and interleave their logs). After the first is killed with SIGKILL, its run
    resumes: the OS dropped the lock."""
    import os
    import signal
    import time
    out = tmp_path / "shared"
    args = ["train", "--data", str(text_file), *TINY, "--steps", "100000", "--eval-interval", "5", "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-m", "minimosaic.cli", *args], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "MINIMOSAIC_DATA_DIR": str(data_dir)})
    try:
        deadline = time.time() + 120
        while not (out / "latest.npz").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "latest.npz").exists(), "the first run wrote no checkpoint"
        a_gpt_into_it = invoke(capsys, "train", "--data", text_file, *TINY, "--model", "gpt", "--out", out)
        a_resume_of_it = invoke(capsys, "train", "--out", out, "--resume", "--steps", "100001")
        for result in (a_gpt_into_it, a_resume_of_it):
            assert_user_error(result, f"is in use by another training run (PID {first.pid})")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    code, printed, err = invoke(capsys, "train", "--out", out, "--resume", "--steps", "100000", "--time-limit", "0.5")
    assert code == 0, err


def test_temporaries_of_an_interrupted_save_are_removed_and_reported(capsys, text_file, data_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--data", text_file, *TINY, "--steps", "2", "--eval-interval", "2", "--out", out]
    assert invoke(capsys, *args)[0] == 0
    (out / ".best.npz.k9x2.tmp").write_bytes(b"\0" * 300_000)  # what kill -9 during a save leaves
    (out / "log.tmp").write_bytes(b"")
    code, printed, _ = invoke(capsys, *args[:-4], "--steps", "4", "--eval-interval", "2", "--out", out, "--resume")
    assert code == 0 and "cleaned  2 temporary file(s) of an interrupted save (0.3 MiB freed)" in printed
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_steps_below_the_warmup_are_warned_about(capsys, text_file, data_dir, tmp_path):
    code, out, _ = invoke(capsys, "train", "--data", text_file, *TINY, "--steps", "1", "--eval-interval", "1",
                          "--out", tmp_path / "short")
    assert code == 0 and ("warning  --steps 1 is below --warmup 2: the learning rate never reaches its peak"
                          in out)


def test_the_encoded_id_cache_is_the_same_folder_with_or_without_data_dir(capsys, text_file, tmp_path,
                                                                          monkeypatch):
    """--data-dir and $MINIMOSAIC_DATA_DIR used to differ: one wrote encoded/ into the data folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for i, how in enumerate(("option", "environment")):
        extra = ["--data-dir", tmp_path / "data"] if how == "option" else []
        if how == "environment":
            monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
        assert invoke(capsys, "train", "--data", text_file, *TINY, "--steps", "1", "--eval-interval", "1",
                      "--warmup", "0", "--out", tmp_path / f"run{i}", *extra)[0] == 0
    assert not (tmp_path / "data" / "encoded").exists()
    assert len(list((tmp_path / "cache" / "minimosaic" / "encoded").glob("*.npy"))) == 1
