"""Data-parallel training: the same run on N processes (MPI ranks), with the same result.

Every rank holds a full copy of the model. Each optimizer step, the batch a single process would draw
is cut into N equal row slices, rank r computes the gradient of its slice's mean loss, and an all-reduce
sums the N gradients on every rank; divided by N, that is the gradient of the whole batch's mean loss:

    L = (1/B) sum_b l_b = (1/N) sum_r [ (1/(B/N)) sum_{b in slice r} l_b ] = (1/N) sum_r L_r
    dL/dw = (1/N) sum_r dL_r/dw                                    (the mean of the ranks' gradients)

Every rank then clips and applies the same AdamW update to the same weights, so the copies stay equal
without ever being sent again (rank 0 broadcasts them once, at the start, and every rank checks a digest
of its weights and settings against rank 0's). It breaks where a loss is not a mean of per-row terms:
statistics over the batch (batch norm; neither model has one), dropout (each rank draws its own masks:
the run is as random as a single process's, not equal to it), and slices of unequal size (a mean of
means is not the mean: the batch must divide by the ranks).

The engines are the ones clusters run: MPI through mpi4py (`pip install -e '.[dist]'` brings mpi4py and
MPICH's PyPI wheels), and on GPUs NCCL through CuPy, its id handed out over MPI. Launch with
`mpiexec -n N minimosaic train ...`, or `minimosaic train --nproc N ...`, which starts mpiexec for you.

  World          one process (size 1): every collective is the identity; what `train` gets by default
  MPIWorld       rank, size, and the collectives the trainer needs, over an mpi4py communicator
  GradientBuckets the gradients packed into flat buffers of about BUCKET_BYTES, all-reduced in place
  world_from_environment()  the World that the launcher (mpiexec, or nothing) set up for this process
"""
import contextlib
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from .. import backend
from ..errors import MinimosaicError

BUCKET_BYTES = 1 << 22   # 4 MiB: large enough that each message costs its bytes, not its latency
DIST_EXTRA = "pip install -e '.[dist]' (mpi4py and MPICH from PyPI)"
# Environment variables that MPI launchers set in each process they start: (rank, size)
_LAUNCHER_VARS = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
                  ("PMIX_RANK", "PMIX_SIZE"))
ERROR_GRACE_S = 1.0  # a failing rank other than 0 waits this long before aborting the job (see abort_on_error)


class CollectiveError(MinimosaicError):
    """An error that every rank raises with the same message: rank 0 alone reports it."""


def launcher_rank_size():
    """(rank, size) that an MPI launcher put in this process's environment; (0, 1) when started alone."""
    for rank, size in _LAUNCHER_VARS:
        if os.environ.get(size):
            return int(os.environ.get(rank, 0)), int(os.environ[size])
    return 0, 1


class World:
    """A job of one process: rank 0 of 1. The collectives return their input."""
    rank, size, local_rank, local_size = 0, 1, 0, 1

    @property
    def is_root(self):
        """True on the rank that writes logs, checkpoints and plots."""
        return self.rank == 0

    def average_gradients(self, params, loss):
        return loss

    def average(self, value):
        return value

    def any(self, *flags):
        return tuple(bool(f) for f in flags)

    def broadcast_parameters(self, params):
        pass

    def check_same(self, settings, arrays):
        pass

    @contextlib.contextmanager
    def collective_errors(self):
        yield

    @contextlib.contextmanager
    def root_first(self):
        yield

    def check_batch(self, batch_size):
        pass

    def use_device(self, device):
        pass

    def shard(self, x, y):
        return x, y

    def describe(self):
        return "1 process"


class MPIWorld(World):
    """rank r of size N over an mpi4py communicator; on a GPU the gradients go through NCCL.

    stats: bytes all-reduced and seconds spent in the gradient all-reduce since the last reset
    (benchmarks/data_parallel.py reads them)."""

    def __init__(self, comm):
        from mpi4py import MPI
        self.MPI, self.comm, self.device = MPI, comm, "cpu"
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)  # the ranks on this machine
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.nccl = None
        self.buckets = None
        self.stats = dict(allreduce_bytes=0, allreduce_s=0.0, steps=0)

    def use_device(self, device):
        """Run on `device`; 'gpu' gives each rank on a machine its own GPU and starts NCCL."""
        device = backend.normalize_device(device)
        if device == self.device or device == "cpu":
            self.device = device
            return
        self.device = device
        cupy = backend.array_module("gpu")  # a clear error if CuPy or the GPU is missing
        gpus = cupy.cuda.runtime.getDeviceCount()
        if self.local_size > gpus:
            raise CollectiveError(f"{self.local_size} ranks on this machine but {gpus} GPU(s): start at most "
                                  f"{gpus} rank(s) per machine with --device gpu (one GPU per rank)")
        cupy.cuda.Device(self.local_rank).use()
        try:
            from cupy.cuda import nccl
        except ImportError:
            nccl = None
        if nccl is None or not nccl.available:
            raise CollectiveError("--device gpu on several ranks needs NCCL: pip install nvidia-nccl-cu12 "
                                  "(or -cu13, matching your CuPy)")
        uid = nccl.get_unique_id() if self.rank == 0 else None
        self.nccl_module = nccl
        self.nccl = nccl.NcclCommunicator(self.size, self.comm.bcast(uid, root=0), self.rank)

    def describe(self):
        library = " ".join(self.MPI.Get_library_version().split("\n")[0].split())  # e.g. 'MPICH Version: 5.0.2'
        engine = "NCCL" if self.nccl is not None else library
        return f"{self.size} ranks ({engine})"

    # ---------------------------------------------------------------- the step's collectives
    def average_gradients(self, params, loss):
        """Every parameter's gradient <- its mean over the ranks; returns the mean of the ranks' `loss`
        (it rides in the last bucket's spare slot: one message fewer)."""
        params = list(params)
        if self.buckets is None or not self.buckets.fits(params):
            self.buckets = GradientBuckets(params)
        start = time.perf_counter()
        loss = self.buckets.average(params, loss, self._allreduce_sum, self.size)
        self.stats["allreduce_s"] += time.perf_counter() - start
        self.stats["allreduce_bytes"] += self.buckets.nbytes
        self.stats["steps"] += 1
        return loss

    def _allreduce_sum(self, buffers):
        """Each flat buffer <- its elementwise sum over the ranks, in place."""
        if self.nccl is not None:
            cupy, nccl = backend.array_module("gpu"), self.nccl_module
            types = {np.dtype(np.float32): nccl.NCCL_FLOAT32, np.dtype(np.float64): nccl.NCCL_FLOAT64}
            stream = cupy.cuda.get_current_stream().ptr
            for b in buffers:
                self.nccl.allReduce(b.data.ptr, b.data.ptr, b.size, types[b.dtype], nccl.NCCL_SUM, stream)
            return
        for b in buffers:  # one blocking call per bucket: MPICH's is 2-3x faster than its Iallreduce here
            self.comm.Allreduce(self.MPI.IN_PLACE, b, op=self.MPI.SUM)  # (benchmarks/NOTES.md, entry 12)

    def average(self, value):
        """The mean over the ranks of a host number (a validation loss)."""
        return self.comm.allreduce(float(value), op=self.MPI.SUM) / self.size

    def any(self, *flags):
        """Each flag ORed over the ranks: a decision (stop now) that every rank takes at the same step."""
        votes = np.array([bool(f) for f in flags], dtype=np.int32)
        self.comm.Allreduce(self.MPI.IN_PLACE, votes, op=self.MPI.MAX)
        return tuple(bool(v) for v in votes)

    # ---------------------------------------------------------------- the start of a run
    def broadcast_parameters(self, params):
        """Rank 0's weights to every rank (through the host: it happens once)."""
        for p in params:
            host = np.ascontiguousarray(backend.asnumpy(p.data))
            self.comm.Bcast(host, root=0)
            p.data = backend.to_device(host, p.device).astype(p.dtype, copy=False)

    def check_same(self, settings, arrays):
        """CollectiveError on every rank, naming the first difference, unless every rank has rank 0's
        settings (a JSON-able dict, of dicts or values) and bit-identical arrays (the weights and the
        optimizer's moments)."""
        digest = hashlib.sha256()
        for a in arrays:
            digest.update(np.ascontiguousarray(backend.asnumpy(a)).tobytes())
        flat = {f"{group}.{key}" if isinstance(values, dict) else group: value
                for group, values in settings.items()
                for key, value in (values.items() if isinstance(values, dict) else [(None, values)])}
        gathered = self.comm.allgather((json.dumps(flat, sort_keys=True, default=str), digest.hexdigest()))
        reference = json.loads(gathered[0][0])
        for rank, (text, weights) in enumerate(gathered[1:], start=1):
            mine = json.loads(text)
            for key in sorted(set(reference) | set(mine)):
                if reference.get(key) != mine.get(key):
                    raise CollectiveError(f"rank {rank} differs from rank 0 in {key}: {mine.get(key)!r} there, "
                                          f"{reference.get(key)!r} on rank 0; start every rank with the "
                                          f"same command and data")
            if weights != gathered[0][1]:
                raise CollectiveError(f"rank {rank}'s weights or optimizer state differ from rank 0's: "
                                      f"check that every rank reads the same checkpoint and runs the same "
                                      f"minimosaic and NumPy")

    @contextlib.contextmanager
    def collective_errors(self):
        """A user error raised inside on any rank is raised on every rank (CollectiveError, naming the
        rank where it is not the same everywhere), so all stop together with one message."""
        message = None
        try:
            yield
        except MinimosaicError as error:
            message = str(error)
        messages = self.comm.allgather(message)
        failed = [(r, m) for r, m in enumerate(messages) if m is not None]
        if failed:
            rank, text = failed[0]
            same_everywhere = len(failed) == self.size and len(set(messages)) == 1
            raise CollectiveError(text if same_everywhere else f"rank {rank}: {text}")

    @contextlib.contextmanager
    def root_first(self):
        """Rank 0 runs the block first (it fills the caches: tokenizer, encoded ids), then the others."""
        if self.rank != 0:
            self.comm.Barrier()
        try:
            yield
        finally:
            if self.rank == 0:
                self.comm.Barrier()

    def check_batch(self, batch_size):
        if batch_size % self.size:
            raise CollectiveError(f"--batch-size {batch_size} does not divide among {self.size} ranks: use a "
                                  f"multiple of {self.size} (the batch is the whole step's; each rank takes "
                                  f"batch / ranks rows)")

    def shard(self, x, y):
        """This rank's rows of a global batch (B, T): rows [r B/N, (r+1) B/N)."""
        rows = len(x) // self.size
        part = slice(self.rank * rows, (self.rank + 1) * rows)
        return x[part], y[part]

    def abort(self, code):
        self.comm.Abort(code)


class GradientBuckets:
    """The parameters' gradients packed into flat buffers of about BUCKET_BYTES (one dtype each), plus
    one spare slot at the end of the last buffer for the loss. A missing gradient counts as zeros (every
    rank must send the same layout)."""

    def __init__(self, params, bucket_bytes=BUCKET_BYTES):
        self.shapes = [p.shape for p in params]
        self.dtype = params[0].dtype
        xp = params[0].xp
        sizes = [int(np.prod(s)) for s in self.shapes]
        per_bucket = max(1, bucket_bytes // self.dtype.itemsize)
        self.groups, group, count = [], [], 0   # groups: [(param index, offset)...] per buffer
        for i, n in enumerate(sizes):
            if group and count + n > per_bucket:
                self.groups.append(group)
                group, count = [], 0
            group.append((i, count))
            count += n
        self.groups.append(group)
        lengths = [offset + sizes[i] for i, offset in (g[-1] for g in self.groups)]
        lengths[-1] += 1  # the loss's slot
        self.buffers = [xp.empty(n, self.dtype) for n in lengths]
        self.sizes = sizes
        self.nbytes = sum(b.nbytes for b in self.buffers)

    def fits(self, params):
        return [p.shape for p in params] == self.shapes and params[0].dtype == self.dtype

    def average(self, params, loss, allreduce_sum, size):
        """Gradients and loss <- their mean over the `size` ranks; allreduce_sum(buffers) sums in place."""
        for group, buffer in zip(self.groups, self.buffers):
            for i, offset in group:
                g = params[i].grad
                buffer[offset:offset + self.sizes[i]] = 0 if g is None else g.reshape(-1)
        self.buffers[-1][-1] = loss
        allreduce_sum(self.buffers)
        for buffer in self.buffers:
            buffer /= size
        for group, buffer in zip(self.groups, self.buffers):
            for i, offset in group:  # views into the buffer: the next step's backward makes new gradients
                params[i].grad = buffer[offset:offset + self.sizes[i]].reshape(self.shapes[i])
        return self.buffers[-1][-1].copy()  # a copy: the next step overwrites the buffer


# ---------------------------------------------------------------- setting a process up
_current = None


def world_from_environment():
    """The World of this process: an MPIWorld when an MPI launcher started it with several ranks,
    else World() (mpi4py is not even imported). Also splits the CPU's cores among the ranks on one
    machine (BLAS threads and the fast layer's pool), unless OMP_NUM_THREADS or OPENBLAS_NUM_THREADS
    says otherwise. CollectiveError when mpi4py is missing."""
    global _current
    rank, size = launcher_rank_size()
    if size <= 1:
        return World()
    try:
        from mpi4py import MPI
    except ImportError:
        raise CollectiveError(f"this process is one of {size} ranks started by an MPI launcher, but mpi4py is "
                              f"not installed: {DIST_EXTRA}") from None
    _current = MPIWorld(MPI.COMM_WORLD)
    share_cores(_current.local_size)
    return _current


def current_world():
    """The MPIWorld that world_from_environment made in this process, or None."""
    return _current


def share_cores(local_size):
    """Give each of the `local_size` ranks on this machine its share of the cores (at least one)."""
    if local_size <= 1 or os.environ.get("OMP_NUM_THREADS") or os.environ.get("OPENBLAS_NUM_THREADS"):
        return
    from . import cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = max(1, cores // local_size)
    cpu.set_blas_threads(threads)
    cpu.set_cpu_workers(threads)


def find_mpiexec():
    """The mpiexec beside this Python (a virtual environment's, from the mpich wheel) or on PATH, or None."""
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def mpi_missing():
    """None when mpi4py imports and an mpiexec is found, else what is missing and how to get it."""
    try:
        import mpi4py
    except ImportError:
        mpi4py = None
    if mpi4py is None:
        return f"mpi4py is not installed: {DIST_EXTRA}"
    if find_mpiexec() is None:
        return f"no MPI launcher (mpiexec) was found: {DIST_EXTRA}"
    return None


def launcher_environment(**extra):
    """os.environ plus `extra`, for a process that runs mpiexec: as root, Open MPI refuses to start unless
    told it may (MPICH does not ask)."""
    env = dict(os.environ, **extra)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


def mpiexec_command(nproc, args):
    """The command that runs `minimosaic <args>` on nproc ranks, and the environment it needs."""
    if launcher_rank_size()[1] > 1:
        raise MinimosaicError("--nproc starts the ranks itself: under mpiexec, leave it out")
    missing = mpi_missing()  # checked here, so the error comes once and not from every rank
    if missing:
        raise MinimosaicError(f"--nproc {nproc} needs MPI, and {missing}")
    mpiexec = find_mpiexec()
    return [mpiexec, "-n", str(nproc), sys.executable, "-m", "minimosaic", *args], launcher_environment()


def abort_on_error(world, message):
    """A rank failed outside a collective: print its message and bring the whole job down (MPI_Abort),
    so no rank is left waiting in an all-reduce. A rank other than 0 first waits ERROR_GRACE_S: when
    every rank fails the same way, rank 0's message is then the one printed, and only once."""
    if world.rank != 0:
        time.sleep(ERROR_GRACE_S)
    print(f"error: rank {world.rank}: {message}", file=sys.stderr, flush=True)
    world.abort(2)
