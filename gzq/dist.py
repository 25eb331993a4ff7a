"""Many processes on PyTorch's own distributed engine (`torchrun --nproc_per_node N -m gzq run ...`).

torchrun starts N copies of the CLI with RANK, WORLD_SIZE and LOCAL_RANK set; `init_from_env` joins them
into one process group (gloo on a CPU, nccl on CUDA). Everything else here is a no-op in a single process,
so the stages call these helpers unconditionally and a run without torchrun is unchanged.

What the stages do with them (README, "Many processes (torchrun)"):
- synthesis: each rank owns every N-th image (`shard`) and optimises only those; the students' gradients
  are averaged (`average_gradients_`), optionally the BN statistics are summed over ranks (gzq.bn);
- calibration: activation ranges and histograms are reduced, so every rank gets the single-process steps;
- fine-tuning and block reconstruction: each rank takes its slice of the same global batch, gradients are
  averaged, so the students stay identical on every rank (`check_identical`);
- evaluation and writing: rank 0 only; it renames the run folder only after every rank reports success.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Iterable

import torch
import torch.distributed as tdist
from torch import nn

#: how long a collective waits for a slow peer (rank 0 evaluating and writing while the others wait); a peer
#: that dies closes its connection, which fails the others at once, long before this
TIMEOUT_S = float(os.environ.get("GZQ_DIST_TIMEOUT_S", "1800"))


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

    gloo for a CPU device, nccl for CUDA (each rank on cuda:LOCAL_RANK). Returns False, doing nothing, when
    there is one process or the group already exists.
    """
    if env_world_size() <= 1 or is_initialized():
        return False
    if device.type == "cuda":
        if torch.cuda.device_count() <= local_rank():
            raise ValueError(f"LOCAL_RANK {local_rank()} needs a GPU of its own, but {torch.cuda.device_count()} "
                             "are visible; start at most that many processes per node")
        torch.cuda.set_device(local_rank())
    tdist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                             timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return True


def shutdown(sync: bool = True) -> None:
    """Leave the process group. With `sync` (a clean finish), first wait until every rank is here: under gloo,
    ranks that tear the group down at different moments sometimes abort at interpreter exit ("terminate
    called without an active exception", SIGABRT). After a failure, leave without waiting for the others."""
    if not is_initialized():
        return
    if sync:
        try:
            tdist.barrier()
        except RuntimeError:   # a peer has already gone: nothing left to wait for
            pass
    tdist.destroy_process_group()


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0, the process that evaluates, writes and reports (True in a single process)."""
    return rank() == 0


def _comm_device() -> torch.device:
    """Where tensors for a collective live: the rank's GPU under nccl, the CPU under gloo."""
    if is_initialized() and tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    if is_initialized():
        tdist.barrier()


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce t over ranks in place ("sum", "min", "max", "mean") and return it; t may live on any device."""
    if not is_initialized():
        return t
    red = {"sum": tdist.ReduceOp.SUM, "mean": tdist.ReduceOp.SUM, "min": tdist.ReduceOp.MIN,
           "max": tdist.ReduceOp.MAX}[op]
    dev = _comm_device()
    buf = t if t.device == dev else t.to(dev)
    tdist.all_reduce(buf, red)
    if op == "mean":
        buf /= world_size()
    if buf is not t:
        t.copy_(buf)
    return t


def all_reduce_floats(values: Iterable[float], op: str = "sum") -> list[float]:
    """A few Python numbers reduced over ranks in one collective (float64)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return all_reduce_(t, op).tolist()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src` on every rank (pickled)."""
    if not is_initialized():
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src, device=_comm_device())
    return box[0]


def shard(n: int) -> torch.Tensor:
    """The indices of n items this rank owns: every world_size-th one from its rank (all of them in a single
    process), so classes and held-out images spread evenly over ranks."""
    return torch.arange(rank(), n, world_size())


def local_slice(idx: torch.Tensor) -> torch.Tensor:
    """This rank's part of a global batch of indices (the whole batch in a single process)."""
    return idx[rank()::world_size()] if world_size() > 1 else idx


def average_gradients_(params: Iterable[torch.Tensor]) -> None:
    """Average the gradients of `params` over ranks with one flat all-reduce: what DistributedDataParallel
    does after backward, for students whose parameters take gradients in two backward passes (synthesis) or
    unit by unit (block reconstruction). A parameter without a gradient on this rank contributes zeros."""
    if world_size() <= 1:
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    all_reduce_(flat, "mean")
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
        offset += n


def broadcast_module_(module: nn.Module, src: int = 0) -> None:
    """Copy rank src's parameters and buffers into `module` on every rank."""
    if world_size() <= 1:
        return
    dev = _comm_device()
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.data if t.device == dev else t.data.to(dev)
        tdist.broadcast(buf, src)
        if buf is not t.data:
            t.data.copy_(buf)


@torch.no_grad()
def check_identical(module: nn.Module, what: str) -> None:
    """Raise when `module`'s parameters differ between ranks (a checksum per tensor, compared by min and max)."""
    if world_size() <= 1:
        return
    sums = torch.stack([t.double().sum() for t in list(module.parameters()) + list(module.buffers())
                        if t.dtype.is_floating_point]).cpu()
    lo, hi = all_reduce_(sums.clone(), "min"), all_reduce_(sums.clone(), "max")
    if not torch.equal(lo, hi):
        raise RuntimeError(f"{what} differs between ranks after training ({int((lo != hi).sum())} tensors)")


def gather_rows(local: torch.Tensor, n: int) -> torch.Tensor:
    """The (n, ...) tensor whose rows shard(n) this rank holds as `local`, assembled on every rank."""
    if world_size() <= 1:
        return local
    full = torch.zeros(n, *local.shape[1:], dtype=local.dtype, device=local.device)
    full[shard(n).to(local.device)] = local
    return all_reduce_(full, "sum")
