"""Data-parallel trials: one trial on N processes (docs/protocol.md §5.7).

Every process ("rank") runs the same command; which rank it is comes from the environment, set either by
:mod:`harness.launch` (``harness run --devices N`` on one machine, the torchrun way: ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``) or by SLURM (``SLURM_PROCID``, ``SLURM_NTASKS``,
``SLURM_LOCALID``; the master is the job's first node). The ranks form one process group: NCCL on GPUs (one GPU per
rank, ``cuda:<local rank>``), gloo on CPUs, with a timeout on every collective (``HARNESS_DIST_TIMEOUT_S``, default
1800 s) so a lost rank never hangs the others.

What stays the one-process trial's (so a trial's identity does not depend on N):

* the global batch: :class:`RankBatches` draws the one-process trial's batches (same sampler, same generator, so
  the same images in the same global batches) and gives each rank a contiguous slice of each (sizes differ by at
  most one image when N does not divide the batch);
* the step: :meth:`World.average_gradients` weights each rank's gradient by its images, so the step is the
  gradient of the global batch's mean loss, whatever the slices' sizes;
* the evaluation: every image of the split is scored by exactly one rank (the same slicing, no padding), and the
  predictions or confusion matrices are gathered before the metric is computed once;
* BatchNorm in trainable heads is synchronised (:func:`sync_batchnorm`: ``nn.SyncBatchNorm`` on GPUs, and on CPUs
  :class:`GlooSyncBatchNorm`, the same computation through a differentiable all-reduce).

Rank 0 writes the record and the epoch checkpoints; every rank resumes from them. A rank that fails leaves a note
(its error) in the group's store and leaves the group; the others' next collective then fails at once and rank 0
writes a failed record naming the rank and why (:meth:`World.failure`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Sampler

from harness.errors import HarnessError

#: seconds a collective may wait before the trial fails (a lost rank must not hang the others)
DEFAULT_TIMEOUT_S = 1800
#: seconds rank 0 waits for the other ranks' failure notes before writing a failed record
NOTE_WAIT_S = 3.0


class PeerLost(RuntimeError):
    """A collective failed: another rank died, left, or did not answer within the timeout."""


class GroupBroken(HarnessError):
    """A data-parallel trial failed and its process group is gone: the command stops (its record is written)."""

    exit_code = 1


@dataclass
class World:
    """This process's place in a data-parallel trial. ``World()`` is the one-process trial: every collective is a
    no-op, so the engine calls them unconditionally."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    #: processes on this node
    local_size: int = 1
    nodes: int = 1
    backend: str | None = None
    #: where collectives run (NCCL needs CUDA tensors)
    device: str = "cpu"
    #: how the ranks were started: "single", "launch" (harness.launch / torchrun) or "slurm"
    source: str = "single"
    timeout_s: int = DEFAULT_TIMEOUT_S
    _store: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict[str, Any]:  # a TrialEnv travels to SLURM jobs: the store stays behind
        state = dict(self.__dict__)
        state["_store"] = None
        return state

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    # ------------------------------------------------------------------------------------------- collectives
    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import torch.distributed as dist

        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError, ConnectionError) as err:  # gloo/NCCL: a peer is gone
            raise PeerLost(f"rank {self.rank}: a collective failed ({str(err).splitlines()[0][:200]})") from err

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            self._call(dist.barrier)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of ``tensor`` (a new tensor on ``tensor``'s device)."""
        if not self.distributed:
            return tensor
        import torch.distributed as dist

        work = tensor.detach().to(self.device).clone()
        self._call(dist.all_reduce, work)
        return work.to(tensor.device)

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.size
        self._call(dist.all_gather_object, out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        self._call(dist.broadcast_object_list, box, 0)
        return box[0]

    def broadcast_module(self, model: nn.Module) -> None:
        """Rank 0's parameters and buffers on every rank (as DDP does at start), so every rank trains the same
        weights even where a model's initialisation draws differently."""
        if not self.distributed:
            return
        import torch.distributed as dist

        for tensor in [*model.parameters(), *model.buffers()]:
            work = tensor.data.to(self.device)
            self._call(dist.broadcast, work, 0)
            if work is not tensor.data:
                tensor.data.copy_(work)

    def average_gradients(self, params: list[nn.Parameter], images: int, finite: bool) -> tuple[bool, int]:
        """Make every parameter's ``.grad`` the gradient of the global batch's mean loss: each rank's gradient is
        of ``images`` x its own mean loss (:func:`harness.loop.train_step` scales it), summed over ranks in one
        all-reduce and divided by the global number of images. A parameter no rank has a gradient for keeps None
        (as in the one-process step). Returns (every rank's loss was finite, global images)."""
        grads = [p.grad.detach().reshape(-1).float() if finite and p.grad is not None else
                 torch.zeros(p.numel(), device=p.device) for p in params]
        flags = torch.tensor([float(finite and p.grad is not None) for p in params] + [float(images),
                             0.0 if finite else 1.0], device=grads[0].device if grads else "cpu")
        flat = self.all_reduce_sum(torch.cat([*grads, flags]))
        nonfinite, total = flat[-1].item(), flat[-2].item()
        if nonfinite > 0:
            return False, int(total)
        offset, has = 0, flat[-(len(params) + 2):-2]
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = (flat[offset:offset + n].view_as(p).to(p.dtype) / max(total, 1.0)) if has[i] > 0 else None
            offset += n
        return True, int(total)

    # ---------------------------------------------------------------------------------------------- failures
    def note_failure(self, err: BaseException) -> None:
        """Leave this rank's error in the group's store for rank 0's record (best effort: the store lives in rank
        0's process)."""
        if not self.distributed or self._store is None:
            return
        text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:500]
        kind = "lost" if peer_loss(err) else "error"
        try:
            self._store.set(f"harness/failed/{self.rank}", f"{kind}|{text}")
        except Exception:  # noqa: BLE001 - rank 0 (the store) may be gone itself
            pass

    def failure(self, err: BaseException) -> dict[str, Any]:
        """What a failed data-parallel trial's record says: which rank failed and why. Rank 0 waits a moment for
        the others' notes; a rank that left none ended without a word (killed, out of memory, its node lost)."""
        own = "lost" if peer_loss(err) else "error"
        notes: dict[int, tuple[str, str]] = {self.rank: (own, f"{type(err).__name__}: {err}"[:500])}
        deadline = time.monotonic() + NOTE_WAIT_S
        while self._store is not None and time.monotonic() < deadline and len(notes) < self.size:
            for rank in range(self.size):
                if rank in notes:
                    continue
                try:
                    if self._store.check([f"harness/failed/{rank}"]):
                        kind, _, text = self._store.get(f"harness/failed/{rank}").decode().partition("|")
                        notes[rank] = (kind, text)
                except Exception:  # noqa: BLE001
                    deadline = 0
            time.sleep(0.1)
        silent = [r for r in range(self.size) if r not in notes]
        erred = {r: text for r, (kind, text) in notes.items() if kind == "error"}
        if erred:
            rank = min(erred)
            why = f"rank {rank} failed: {erred[rank]}"
        elif silent:
            rank = silent[0]
            why = (f"rank {rank} ended without reporting an error (killed, out of memory, or its node lost) "
                   "while the others waited for it")
        else:
            rank, why = self.rank, notes[self.rank][1]
        return {"failed_rank": rank, "why": why, "silent_ranks": silent,
                "notes": {str(r): text for r, (_, text) in sorted(notes.items())}}

    def describe_local(self) -> dict[str, Any]:
        """What this rank knows of the group without asking the others (a failed trial's record)."""
        out: dict[str, Any] = {"world_size": self.size}
        if self.distributed:
            out.update(backend=self.backend, nodes=self.nodes, processes_per_node=self.local_size,
                       source=self.source)
        return out

    def describe(self, batch_size: int | None = None) -> dict[str, Any]:
        """The record's ``distributed`` section (a collective: every rank calls it)."""
        out = self.describe_local()
        if not self.distributed:
            return out
        out["ranks"] = self.gather_objects({"rank": self.rank, "host": socket.gethostname(), "device": self.device})
        if batch_size is not None:
            out["rank_batch"] = [len(rank_slice(batch_size, r, self.size)) for r in range(self.size)]
        return out


SINGLE = World()

#: words of the errors gloo and NCCL raise when another rank is gone (raised outside :class:`World`'s own calls,
#: e.g. in a synchronised BatchNorm's all-reduce)
_LOST_WORDS = ("connection closed by peer", "connection reset by peer", "broken pipe", "timed out",
               "communicator was aborted", "socket closed")


def peer_loss(err: BaseException) -> bool:
    """Whether ``err`` says another rank is gone (rather than this rank's own failure)."""
    if isinstance(err, PeerLost):
        return True
    try:
        import torch.distributed as dist

        if isinstance(err, dist.DistBackendError):
            return True
    except (ImportError, AttributeError):
        pass
    text = str(err).lower()
    return any(word in text for word in _LOST_WORDS)


# -------------------------------------------------------------------------------------------------- start-up
def requested_world() -> tuple[int, int, int, int, str] | None:
    """(rank, size, local rank, local size, source) from the environment, or None outside a data-parallel
    start. torchrun-style variables win over SLURM's (a launch inside a SLURM job)."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        size = int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_WORLD_SIZE", size))
        return int(env["RANK"]), size, int(env.get("LOCAL_RANK", env["RANK"])), local, "launch"
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_PROCID" in env and env.get("HARNESS_SLURM_DDP"):
        size = int(env["SLURM_NTASKS"])
        local = int((env.get("SLURM_NTASKS_PER_NODE") or str(size)).split("(")[0].split(",")[0])
        return int(env["SLURM_PROCID"]), size, int(env.get("SLURM_LOCALID", "0")), local, "slurm"
    return None


def slurm_master() -> str:
    """The first host of the SLURM job's node list."""
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "127.0.0.1"
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.split():
            return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodes.split(",")[0].split("[")[0]


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def check_backend(device: str) -> None:
    """Refuse a backend this torch build cannot start (one line, before anything runs)."""
    import torch.distributed as dist

    backend = backend_for(device)
    if not dist.is_available():
        raise HarnessError("--devices: this torch build has no torch.distributed; data-parallel trials need it")
    available = dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available()
    if not available:
        raise HarnessError(f"--devices: the {backend} backend is not available in this torch build "
                           f"(device {device}); data-parallel trials on {device} need it")


def start(device: str) -> World:
    """This process's :class:`World` from the environment, with its process group started (a no-op single world
    when nothing asks for data parallelism). On GPUs each rank takes ``cuda:<local rank>``; on CPUs the ranks the
    harness launched share this machine's cores (a SLURM task keeps the threads its job set)."""
    found = requested_world()
    if found is None or found[1] <= 1:
        return SINGLE
    import torch.distributed as dist

    rank, size, local_rank, local_size, source = found
    check_backend(device)
    if str(device).startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    elif source == "launch":  # this machine's cores, shared by its ranks (a SLURM task has its own CPUs)
        from harness.train import usable_cpus

        torch.set_num_threads(max(1, usable_cpus() // max(1, local_size)))
    timeout = int(os.environ.get("HARNESS_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    host = os.environ.get("MASTER_ADDR") or (slurm_master() if source == "slurm" else "127.0.0.1")
    port = int(os.environ.get("MASTER_PORT") or 20000 + int(os.environ.get("SLURM_JOB_ID", "0") or 0) % 20000)
    try:
        store = dist.TCPStore(host, port, size, is_master=rank == 0, timeout=timedelta(seconds=min(timeout, 300)))
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=size,
                                timeout=timedelta(seconds=timeout))
    except Exception as err:  # noqa: BLE001 - one line, exit 2: nothing ran yet
        raise HarnessError(f"could not start the {backend_for(device)} process group of {size} processes "
                           f"(rank {rank}, master {host}:{port}): {str(err).splitlines()[0]}") from None
    nodes = max(1, size // max(1, local_size))
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size, nodes=nodes,
                 backend=backend_for(device), device=device, source=source, timeout_s=timeout, _store=store)


def stop(world: World) -> None:
    """Leave the process group (at the end of a command)."""
    if world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ data
def rank_slice(n: int, rank: int, size: int) -> range:
    """Rank ``rank``'s contiguous part of ``n`` items (the first ``n % size`` ranks take one more)."""
    return range(rank * n // size, (rank + 1) * n // size)


class RankBatches(Sampler[list[int]]):
    """The one-process loader's batches (``sampler`` in batches of the global ``batch_size``), each cut into
    ``size`` contiguous slices of which this rank takes its own. Every rank draws the same batches (the sampler's
    generator is seeded alike everywhere and restored from the same checkpoint), so the global batch is the
    one-process batch. ``skip_empty``: leave out slices with no images (evaluation); training keeps them, so that
    every rank takes part in every step's all-reduce."""

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool, rank: int, size: int,
                 skip_empty: bool = False):
        self.batches = BatchSampler(sampler, batch_size, drop_last)
        self.rank, self.size, self.skip_empty = rank, size, skip_empty

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            part = [batch[i] for i in rank_slice(len(batch), self.rank, self.size)]
            if part or not self.skip_empty:
                yield part

    def __len__(self) -> int:
        return len(self.batches)


class _EmptyAware:
    """A collate that gives None for a rank's empty slice of a batch (it takes part in the step with nothing)."""

    def __init__(self, collate: Callable | None):
        self.collate = collate

    def __call__(self, items: list[Any]) -> Any:
        if not items:
            return None
        from torch.utils.data import default_collate

        return (self.collate or default_collate)(items)


def shard_loader(loader: DataLoader, world: World, train: bool = True) -> DataLoader:
    """``loader`` as this rank's part of it (:class:`RankBatches`; the loader itself for one process). ``train``:
    empty slices stay (as None batches) so every rank steps together; else they are left out."""
    if not world.distributed:
        return loader
    if loader.batch_size is None:
        raise ValueError("shard_loader: the loader needs a batch_size (a global batch to cut)")
    if train and int(loader.batch_size) < world.size:
        raise HarnessError(f"a global batch of {loader.batch_size} is smaller than the {world.size} processes: "
                           "each process needs at least one image of every global batch")
    batches = RankBatches(loader.sampler, int(loader.batch_size), loader.drop_last, world.rank, world.size,
                          skip_empty=not train)
    workers = loader.num_workers
    return DataLoader(loader.dataset, batch_sampler=batches,
                      collate_fn=_EmptyAware(loader.collate_fn) if train else loader.collate_fn,
                      num_workers=workers, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      generator=loader.generator,  # each pass draws its workers' seed from it, as the original
                      persistent_workers=workers > 0 and loader.persistent_workers)


# ---------------------------------------------------------------------------------------------- batch norm
class _AllReduceSum(torch.autograd.Function):
    """The sum over ranks, differentiable: every rank's loss depends on the sum, so the gradient of a rank's input
    is the sum over ranks of the gradients of the sum."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        out = grad.clone()
        dist.all_reduce(out)
        return out


class GlooSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on CPUs (``nn.SyncBatchNorm`` only runs
    on GPUs): per-channel sums, squared sums and counts all-reduced through a differentiable all-reduce, so the
    gradient flows through the global statistics as in SyncBatchNorm."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not torch.distributed.is_initialized():
            return super().forward(x)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.float()
        count = torch.tensor([xf.numel() // max(1, channels)], dtype=xf.dtype)
        stats = _AllReduceSum.apply(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count]))
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels:2 * channels] / total - mean * mean).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
                self.running_var.mul_(1 - momentum).add_(momentum * unbiased.detach())
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, world: World) -> nn.Module:
    """Every BatchNorm of ``model`` synchronised over the ranks (mmsegmentation's SyncBN): ``nn.SyncBatchNorm``
    on GPUs, :class:`GlooSyncBatchNorm` on CPUs. Weights, buffers and ``requires_grad`` carry over."""
    if not world.distributed:
        return model
    if str(world.device).startswith("cuda"):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _convert_cpu(model)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
        out = GlooSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats)
        if module.affine:
            with torch.no_grad():
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            out.weight.requires_grad_(module.weight.requires_grad)
            out.bias.requires_grad_(module.bias.requires_grad)
        if module.track_running_stats:
            out.running_mean, out.running_var = module.running_mean, module.running_var
            out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
