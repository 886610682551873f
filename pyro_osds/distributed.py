# Copyright Contributors to the pyro_osds project.
# SPDX-License-Identifier: Apache-2.0
r"""
Data-parallel training and sharded drawing over :mod:`torch.distributed` (PyTorch's own engine: ``gloo`` on
CPUs, ``nccl`` on GPUs), for scripts launched the standard way::

    torchrun --nproc_per_node=2 my_script.py

where the script calls ``torch.distributed.init_process_group(...)`` before ``OSDS(model).run(...)``. An
:class:`~pyro_osds.OSDS` that finds an initialised process group of more than one process trains and draws
across it (:func:`current`):

* **Training** shards every batch: each rank draws the *whole* batch's base noise from the chain's random
  stream (identical on every rank: the stream is seeded from rank 0's seed), keeps its slice
  (:func:`shard`), and the gradients of the shard losses are summed across ranks with weights
  :math:`n_r / n` (:func:`all_reduce_gradients`), so every rank takes the same optimiser step, equal to that
  of one process training on the whole batch (to floating-point summation order). The training draws'
  log-weights are gathered, so the recorded ELBO and ESS/N (and the early stop they drive) are those of the
  whole batch on every rank.
* **Before training**, the mode search, the preconditioner and the random stream's state of rank 0 are
  broadcast (:func:`broadcast_object`), so that every rank trains the same sampler even where floating point
  is not reproducible across devices.
* **Drawing** is sharded: rank :math:`r` draws its share from its own stream and the draws are gathered
  (:func:`all_gather_rows`), so every rank holds the union, and log Z, its SE, the Kish ESS and PSIS k-hat are
  computed on the union exactly as one process would on the same draws.
* Only rank 0 shows progress bars and writes checkpoints; a checkpoint resumes on any world size.

A rank that dies makes the others' next collective fail: :class:`DistributedError` says so, and which file to
resume from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["DistributedContext", "DistributedError", "all_gather_rows", "all_reduce_gradients", "all_reduce_sum",
           "broadcast_object", "current", "from_rank_zero", "process_group", "shard"]


class DistributedError(RuntimeError):
    """A collective operation of the process group failed (typically: another rank died or was killed)."""


class DistributedContext(NamedTuple):
    """The process group OSDS runs in: this process's ``rank`` of ``world_size``, and the ``group``
    (``None``: the default group)."""

    rank: int
    world_size: int
    group: object = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes checkpoints."""
        return self.rank == 0


def current() -> DistributedContext | None:
    """The initialised default process group if it has more than one process, else ``None`` (a single
    process: nothing to distribute)."""
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized():
        return None
    world_size = dist.get_world_size()
    return DistributedContext(dist.get_rank(), world_size) if world_size > 1 else None


def process_group(config) -> DistributedContext | None:
    """The initialised process group (:func:`current`) to train and draw across with ``config`` (an
    :class:`~pyro_osds.config.OSDSConfig`), which must train by the one-step objective; ``None`` in one process."""
    ctx = current()
    if ctx is None:
        return None
    if config.method != "osds" or config.objective.diffusion.weight > 0 or config.objective.flow_kl.weight <= 0:
        raise ValueError(
            f"Training across a process group ({ctx.world_size} ranks) supports the one-step objective (the "
            f"default, method='osds' with `diffusion_weight=0`); got method={config.method!r} with "
            f"`diffusion_weight`={config.objective.diffusion.weight}. Use the default objective, or run one "
            "process per model.")
    return ctx


def _collective(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, ValueError) as err:  # gloo / nccl report a lost peer as RuntimeError
        raise DistributedError(
            f"A collective operation across the process group failed ({type(err).__name__}: {err}). Another rank "
            "has probably died or been killed; every rank stops here. Restart all ranks (`torchrun ...`) with "
            "`OSDS(..., checkpoint=path, resume=True)` to continue from the last checkpoint."
        ) from err


def shard(num: int, ctx: DistributedContext) -> slice:
    """This rank's contiguous share of ``num`` items: ranks get ``num // world_size`` or one more."""
    start = num * ctx.rank // ctx.world_size
    stop = num * (ctx.rank + 1) // ctx.world_size
    return slice(start, stop)


def _wire_device(ctx: DistributedContext, device: torch.device) -> torch.device:
    """Where tensors travel: the GPU for ``nccl`` (which takes no CPU tensors), the CPU for ``gloo``."""
    if torch.distributed.get_backend(ctx.group) == "nccl":
        return device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """The sum over ranks of ``values`` (a float64 copy is reduced; returned in ``values``' dtype and device)."""
    buffer = values.detach().to(dtype=torch.float64, device=_wire_device(ctx, values.device)).clone()
    _collective(torch.distributed.all_reduce, buffer, group=ctx.group)
    return buffer.to(dtype=values.dtype, device=values.device)


def all_reduce_gradients(parameters, share: float, ctx: DistributedContext) -> None:
    r"""Replaces every parameter's gradient :math:`g_r` (of this rank's shard loss) by
    :math:`\sum_r s_r g_r` over the ranks, with ``share`` :math:`s_r = n_r / n` this rank's fraction of the
    batch (missing gradients count as zeros); one flat all-reduce in the gradients' dtype."""
    params = [p for p in parameters if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * share for p in params])
    wire = flat.to(_wire_device(ctx, flat.device))
    _collective(torch.distributed.all_reduce, wire, group=ctx.group)
    flat = wire.to(flat.device)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def all_gather_rows(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """The rows of ``values`` ``(n_r, ...)`` of every rank, concatenated in rank order ``(sum_r n_r, ...)``
    (uneven counts allowed; gathered on the CPU for ``gloo``, on the device for ``nccl``)."""
    device = _wire_device(ctx, values.device)
    dtype = values.dtype
    data = values.detach().to(device)
    if dtype == torch.bool:
        data = data.to(torch.uint8)
    counts = torch.zeros(ctx.world_size, dtype=torch.int64, device=device)
    counts[ctx.rank] = data.shape[0]
    _collective(torch.distributed.all_reduce, counts, group=ctx.group)
    width = int(counts.max())
    padded = torch.zeros((width,) + tuple(data.shape[1:]), dtype=data.dtype, device=device)
    padded[: data.shape[0]] = data
    pieces = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    _collective(torch.distributed.all_gather, pieces, padded, group=ctx.group)
    out = torch.cat([piece[: int(n)] for piece, n in zip(pieces, counts.tolist(), strict=True)])
    return out.to(dtype=dtype, device=values.device)


def broadcast_object(obj, ctx: DistributedContext, src: int = 0):
    """Rank ``src``'s ``obj`` (any picklable object, tensors moved to the CPU) on every rank."""
    box = [obj if ctx.rank == src else None]
    _collective(torch.distributed.broadcast_object_list, box, src=src, group=ctx.group)
    return box[0]


def from_rank_zero(obj, generator: torch.Generator, ctx: DistributedContext):
    """Rank 0's ``obj`` on every rank, and the state of rank 0's ``generator`` set on every rank's, so that what
    rank 0 computed with its random stream (a mode search, a fit) is every rank's, and their streams go on in
    step. Tensors in ``obj`` arrive on the device they left from: move them where they belong."""
    obj, state = broadcast_object((obj, generator.get_state()), ctx)
    generator.set_state(state)
    return obj
