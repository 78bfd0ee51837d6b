"""Data-parallel training (minimosaic/fast/distributed.py): N ranks give the run one process gives.

The pieces first, without MPI (the buckets' packing, a batch's slices, the launcher's command line),
then real jobs under `mpiexec -n 2` (MPICH from PyPI in CI; skipped with a reason where mpi4py or
mpiexec is missing): in float64, 2 ranks with B/2 rows each end 3 AdamW steps with the weights of one
process with B rows, to 1e-12; a 2-rank run stopped and resumed on 1 rank ends where an uninterrupted
2-rank run ends; Ctrl-C saves once; a failing rank brings the job down; bad input gets one line.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from minimosaic import cli, nn
from minimosaic.models import ModelConfig, build_model
from minimosaic.fast import distributed
from minimosaic.fast.distributed import GradientBuckets, World

TINY = ["--n-layer", "2", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--pmem-size", "16",
        "--eval-batches", "2", "--warmup", "1", "--log-interval", "1", "--lr", "3e-3"]


# ---------------------------------------------------------------- the pieces, in one process
class Param:
    def __init__(self, grad, shape=None):
        self.grad = grad
        self.shape = grad.shape if grad is not None else shape
        self.dtype = np.dtype(np.float64)
        self.xp = np


def simulated_ranks(ranks):
    """allreduce_sum functions for `ranks` ranks simulated by threads of this process: rank r's call
    waits for every rank's buffers, then leaves their sum in its own."""
    barrier, sent = threading.Barrier(ranks), {}

    def allreduce_sum_of(rank):
        def allreduce_sum(buffers):
            sent[rank] = [b.copy() for b in buffers]
            barrier.wait()
            for i, b in enumerate(buffers):
                b[...] = sum(sent[r][i] for r in range(ranks))
        return allreduce_sum
    return allreduce_sum_of


@pytest.mark.parametrize("bucket_bytes,buffers", [(8, 4), (100, 3), (1 << 20, 1)])
def test_buckets_average_gradients_and_loss_over_ranks(bucket_bytes, buffers):
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (5,), (2, 2, 2), (1,)]
    ranks, losses = 3, [1.0, 2.0, 6.0]
    grads = [[rng.standard_normal(s) for s in shapes] for _ in range(ranks)]
    grads[1][2] = None  # a parameter without a gradient on one rank counts as zeros
    expected = [sum(np.zeros(s) if grads[r][i] is None else grads[r][i] for r in range(ranks)) / ranks
                for i, s in enumerate(shapes)]
    params = [[Param(g, s) for g, s in zip(gs, shapes)] for gs in grads]
    buckets = [GradientBuckets(p, bucket_bytes) for p in params]
    assert len(buckets[0].buffers) == buffers
    allreduce_sum_of, results = simulated_ranks(ranks), {}

    def rank(r):
        results[r] = buckets[r].average(params[r], losses[r], allreduce_sum_of(r), ranks)
    threads = [threading.Thread(target=rank, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(ranks):
        assert results[r] == pytest.approx(np.mean(losses), abs=1e-15)
        for i, s in enumerate(shapes):
            assert params[r][i].grad.shape == s
            np.testing.assert_allclose(params[r][i].grad, expected[i], rtol=1e-15, atol=1e-15)


def test_shards_are_the_rows_of_the_global_batch():
    x, y = np.arange(24).reshape(8, 3), np.arange(24).reshape(8, 3) + 100

    class Fake(distributed.MPIWorld):
        def __init__(self, rank, size):
            self.rank, self.size = rank, size
    parts = [Fake(r, 4).shard(x, y) for r in range(4)]
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), x)
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), y)
    assert World().shard(x, y) == (x, y)


def test_single_process_world_changes_nothing():
    world = World()
    assert world.size == 1 and world.is_root and world.average(2.5) == 2.5
    assert world.any(True, False, 0) == (True, False, False)
    assert world.average_gradients([], 1.25) == 1.25


def test_launcher_environment_is_read(monkeypatch):
    for rank, size in distributed._LAUNCHER_VARS:
        monkeypatch.delenv(rank, raising=False)
        monkeypatch.delenv(size, raising=False)
    assert distributed.launcher_rank_size() == (0, 1)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert distributed.launcher_rank_size() == (3, 4)


def test_nproc_command_drops_nproc_and_runs_the_same_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["minimosaic", "train", "--nproc", "3", "--steps", "5", "--nproc=3"])
    monkeypatch.setattr(distributed, "find_mpiexec", lambda: "/opt/mpi/bin/mpiexec")
    monkeypatch.setitem(sys.modules, "mpi4py", type(sys)("mpi4py"))
    seen = {}
    monkeypatch.setattr(os, "execvpe", lambda file, args, env: seen.update(args=args, env=env))
    cli._start_ranks(3)
    assert seen["args"] == ["/opt/mpi/bin/mpiexec", "-n", "3", sys.executable, "-m", "minimosaic", "train",
                            "--steps", "5"]
    if os.geteuid() == 0:  # Open MPI refuses to run as root without being told
        assert seen["env"]["OMPI_ALLOW_RUN_AS_ROOT"] == "1"


def one_line_error(capsys, args):
    with pytest.raises(SystemExit) as done:
        cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_nproc_without_mpi_is_one_line(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # import mpi4py -> ImportError
    assert "pip install -e '.[dist]'" in one_line_error(capsys, ["train", "--nproc", "2", "--out", str(tmp_path)])
    monkeypatch.setitem(sys.modules, "mpi4py", type(sys)("mpi4py"))
    monkeypatch.setattr(distributed, "find_mpiexec", lambda: None)
    assert "mpiexec" in one_line_error(capsys, ["train", "--nproc", "2", "--out", str(tmp_path)])


def test_a_rank_without_mpi4py_is_one_line_on_rank_0_only(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "0")
    assert "mpi4py is not installed" in one_line_error(capsys, ["train", "--out", str(tmp_path / "a")])
    monkeypatch.setenv("PMI_RANK", "1")
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--out", str(tmp_path / "b")])
    assert done.value.code == 2 and capsys.readouterr().err == ""


# ---------------------------------------------------------------- real jobs under mpiexec
needs_mpi = pytest.mark.skipif(distributed.mpi_missing() is not None, reason=str(distributed.mpi_missing()))


def job_env(tmp_path):
    return distributed.launcher_environment(MINIMOSAIC_DATA_DIR=str(tmp_path / "data"), OMP_NUM_THREADS="1",
                                            OPENBLAS_NUM_THREADS="1")  # (as root, Open MPI's permission too)


def minimosaic(tmp_path, *args, nproc=None, timeout=120):
    """`minimosaic args` in a subprocess, on nproc ranks under mpiexec (None: one plain process)."""
    command = [sys.executable, "-m", "minimosaic", *map(str, args)]
    if nproc is not None:
        command = [distributed.find_mpiexec(), "-n", str(nproc), *command]
    return subprocess.run(command, env=job_env(tmp_path), capture_output=True, text=True, timeout=timeout)


def weights(out):
    """{name: array} of the weights and AdamW moments in <out>/latest.npz, and its meta."""
    from minimosaic import checkpoint
    arrays, meta = checkpoint.load_checkpoint(out, "latest")
    return arrays, meta


def assert_same_run(a, b, tol=1e-12):
    (wa, ma), (wb, mb) = weights(a), weights(b)
    assert ma["step"] == mb["step"]
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].dtype == np.float64
        np.testing.assert_allclose(wa[name], wb[name], rtol=0, atol=tol, err_msg=name)
    assert ma["val_loss"] == pytest.approx(mb["val_loss"], abs=tol)


@needs_mpi
@pytest.mark.parametrize("model,accum", [("mosaic", 1), ("gpt", 1), ("mosaic", 2)])
def test_two_ranks_train_as_one_process_does(tmp_path, model, accum):
    common = ["train", *TINY, "--model", model, "--precision", "fp64", "--batch-size", "8", "--steps", "3",
              "--eval-interval", "3", "--grad-accum", accum]
    one = minimosaic(tmp_path, *common, "--out", tmp_path / "one")
    two = minimosaic(tmp_path, *common, "--out", tmp_path / "two", nproc=2)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr
    assert "2 ranks" in two.stdout and two.stdout.count("done: step 3") == 1  # rank 0 alone reports
    assert_same_run(tmp_path / "one", tmp_path / "two")
    logs = [[json.loads(line) for line in (tmp_path / name / "log.jsonl").read_text().splitlines()]
            for name in ("one", "two")]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs):  # the logged loss is the whole batch's, not rank 0's half
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-12)


@needs_mpi
def test_stopped_on_two_ranks_resumed_on_one_ends_where_two_ranks_end(tmp_path):
    common = ["train", *TINY, "--precision", "fp64", "--batch-size", "8", "--steps", "4", "--eval-interval", "4"]
    whole = minimosaic(tmp_path, *common, "--out", tmp_path / "whole", nproc=2)
    assert whole.returncode == 0, whole.stderr
    # a time limit this small stops after the first step (with a checkpoint), on every rank together
    cut = minimosaic(tmp_path, *common, "--out", tmp_path / "cut", "--time-limit", "1e-9", nproc=2)
    assert cut.returncode == 0, cut.stderr
    assert weights(tmp_path / "cut")[1]["step"] == 1
    resumed = minimosaic(tmp_path, *common, "--out", tmp_path / "cut", "--resume", "--time-limit", "0")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "whole", tmp_path / "cut")


@needs_mpi
def test_ctrl_c_on_mpiexec_stops_every_rank_and_saves_once(tmp_path):
    out = tmp_path / "run"
    command = [distributed.find_mpiexec(), "-n", "2", sys.executable, "-m", "minimosaic", "train", *TINY,
               "--batch-size", "4", "--steps", "100000", "--eval-interval", "100000", "--out", str(out)]
    job = subprocess.Popen(command, env=job_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
        time.sleep(0.1)
    job.send_signal(signal.SIGINT)  # what Ctrl-C does to mpiexec, which forwards it to every rank
    stdout, stderr = job.communicate(timeout=60)
    assert job.returncode == 130, stderr
    assert stdout.count("interrupted at step") == 1, stdout
    arrays, meta = weights(out)
    assert meta["step"] >= 1 and "Traceback" not in stderr
    resumed = minimosaic(tmp_path, "train", "--out", out, "--resume", "--steps", meta["step"] + 2)
    assert resumed.returncode == 0, resumed.stderr


@needs_mpi
def test_bad_input_on_two_ranks_is_one_line(tmp_path):
    odd = minimosaic(tmp_path, "train", *TINY, "--batch-size", "7", "--out", tmp_path / "a", nproc=2)
    assert odd.returncode == 2 and odd.stderr.strip().splitlines() == [
        "error: --batch-size 7 does not divide among 2 ranks: use a multiple of 2 (the batch is the whole "
        "step's; each rank takes batch / ranks rows)"]
    nested = minimosaic(tmp_path, "train", "--nproc", "2", "--out", tmp_path / "b", nproc=2)
    assert nested.returncode == 2 and nested.stderr.strip().splitlines() == [
        "error: --nproc starts the ranks itself: under mpiexec, leave it out"]


@needs_mpi
def test_ranks_with_different_settings_are_refused_naming_the_difference(tmp_path):
    mpiexec = distributed.find_mpiexec()
    rank = [sys.executable, "-m", "minimosaic", "train", *TINY, "--steps", "2", "--out", str(tmp_path / "r")]
    job = subprocess.run([mpiexec, "-n", "1", *rank, "--seed", "1", ":", "-n", "1", *rank, "--seed", "2"],
                         env=job_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert job.returncode == 2
    assert job.stderr.strip().splitlines() == [
        "error: rank 1 differs from rank 0 in train.seed: 2 there, 1 on rank 0; start every rank with the "
        "same command and data"]


FAILING_RANK = """
import sys
from minimosaic import cli, train
from mpi4py import MPI
step = train.training_step
def failing(*args, **kwargs):
    if MPI.COMM_WORLD.rank == 1 and args[1].steps == 2:
        raise RuntimeError("rank 1 broke at step 3")
    return step(*args, **kwargs)
train.training_step = failing
cli.main(sys.argv[1:])
"""


@needs_mpi
def test_a_rank_that_fails_brings_the_job_down_with_its_message(tmp_path):
    script = tmp_path / "failing.py"
    script.write_text(FAILING_RANK)
    command = [distributed.find_mpiexec(), "-n", "2", sys.executable, str(script), "train", *TINY,
               "--steps", "50", "--out", str(tmp_path / "run")]
    start = time.time()
    job = subprocess.run(command, env=job_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert job.returncode != 0
    assert "error: rank 1: RuntimeError: rank 1 broke at step 3" in job.stderr
    assert time.time() - start < 60  # rank 0 did not wait forever in the all-reduce


@needs_mpi
def test_nproc_starts_the_ranks(tmp_path):
    job = minimosaic(tmp_path, "train", *TINY, "--batch-size", "4", "--steps", "2", "--eval-interval", "2",
                     "--nproc", "2", "--out", tmp_path / "run")
    assert job.returncode == 0, job.stderr
    assert "2 ranks" in job.stdout and weights(tmp_path / "run")[1]["step"] == 2


def test_fp64_precision_trains_in_float64(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIMOSAIC_DATA_DIR", str(tmp_path / "data"))
    nn.manual_seed(0)
    with pytest.raises(SystemExit) as done:
        cli.main(["train", *TINY, "--batch-size", "4", "--steps", "2", "--eval-interval", "2", "--precision",
                  "fp64", "--out", str(tmp_path / "run")])
    assert done.value.code == 0, capsys.readouterr().err
    arrays, _ = weights(tmp_path / "run")
    assert all(a.dtype == np.float64 for a in arrays.values())


def _nccl_missing():
    missing = distributed.mpi_missing()
    if missing:
        return missing
    try:
        from cupy.cuda import nccl
    except ImportError:
        return "CuPy has no NCCL here (pip install nvidia-nccl-cu12, or -cu13)"
    return None if nccl.available else "CuPy has no NCCL here (pip install nvidia-nccl-cu12, or -cu13)"


@pytest.mark.gpu
def test_nccl_world_of_one_gpu_trains_as_no_world():
    """The NCCL path on one GPU (all a one-GPU machine can run): a world of size 1 all-reduces through
    NCCL, and 3 steps end where the same steps without a world end."""
    from minimosaic import backend, optim
    from minimosaic.train import training_step
    if not backend.gpu_available() or _nccl_missing():
        pytest.skip(_nccl_missing() or "no CUDA GPU")
    from mpi4py import MPI
    world = distributed.MPIWorld(MPI.COMM_WORLD)
    world.use_device("gpu")
    assert world.nccl is not None and world.size == 1
    config = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=16, pmem_size=16)
    batches = np.random.default_rng(0).integers(0, 50, size=(3, 2, 4, 16))
    finals = []
    for use_world in (False, True):
        nn.manual_seed(0)
        model = build_model(config).to("gpu", dtype=np.float64)
        opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=1e-3)
        for x, y in batches:
            training_step(model, opt, [(x, y)], 1e-3, 1.0, world=world if use_world else None)
        finals.append(np.concatenate([backend.asnumpy(p.data).ravel() for p in model.parameters()]))
    np.testing.assert_allclose(finals[1], finals[0], rtol=0, atol=1e-14)
    assert world.stats["steps"] == 3


def test_more_gpu_ranks_than_gpus_is_refused(monkeypatch):
    """--device gpu gives each rank on a machine its own GPU: 2 ranks on a 1-GPU machine are refused."""
    from minimosaic import backend

    class FakeCupy:
        class cuda:
            class runtime:
                @staticmethod
                def getDeviceCount():
                    return 1

    class TwoRanksHere(distributed.MPIWorld):
        def __init__(self):
            self.rank, self.size, self.local_rank, self.local_size, self.device = 1, 2, 1, 2, "cpu"
    monkeypatch.setattr(backend, "array_module", lambda device: FakeCupy)
    monkeypatch.setattr(backend, "normalize_device", lambda device: device)
    with pytest.raises(distributed.CollectiveError, match="2 ranks on this machine but 1 GPU"):
        TwoRanksHere().use_device("gpu")
