"""Data-parallel training (``trainer=ddp``): keep every rank's model identical (the ranks are started by
:mod:`qpexp.run.ranks`; a training loader's share: :mod:`qpexp.data.shard`).

Every rank runs the whole pipeline on the same config and run folder; each stage's ``trainer.fit`` is
Lightning DDP over the process group made here. Where a stage computes something from data outside
DDP's gradient averaging, the result is reduced across ranks so that every rank holds the same model:

- importance scores: Taylor gradients (:func:`reduce_weight_grads`; each rank its share of the
  batches, averaged per batch: the gradients of the global batch);
- masks: rank 0's masks broadcast after every pruning step (:func:`sync_masks`);
- quantizer state: observer ranges (min/max and EMA: min of minima, max of maxima; log schemes'
  max|x|) after calibration and after every QAT step, learned step sizes (LSQ) averaged after their
  data-dependent initialization (:func:`sync_quant_state`); calibration batches are shared out
  (:func:`rank_batches`).

At the end of each stage the ranks compare a digest of their model state (:func:`finish_stage`,
``ddp/<stage>_identical`` in the record); a difference is a bug, reported with a warning, and rank 0's
state is broadcast so that the ranks go on alike. Rank 0 alone writes records, checkpoints (Lightning)
and cache entries (:func:`qpexp.run.rank_cache.stage_entry`: the others wait at a barrier, then read the entry).

Ranks are started in one of two ways:

- **by qpexp** (one process per job, the default): rank 0 starts ``devices - 1`` copies of itself
  (``python -m qpexp.run.ranks``, the resolved config on stdin) on this node;
- **by the cluster** (SLURM tasks, ``torchrun``): every process runs ``qpexp``; the ranks come from
  the environment (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``); ranks other than 0
  train along and write nothing.

Every helper is a no-op when ``torch.distributed`` is not initialized (single-process runs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from qpexp.core.modules import clone_state
from qpexp.core.prune.criteria.taylor import weight_grads
from qpexp.core.quant.linear import affine_qparams
from qpexp.core.warning import QpexpWarning

log = logging.getLogger("qpexp")

_SHARD_DATA = True  # ranks get their share of the data (trainer.use_distributed_sampler)
DUMP_ENV = "QPEXP_DDP_DUMP"  # tests: every rank saves its model state after each stage into this folder


# -- where am I -----------------------------------------------------------------------------------
def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's global rank: the process group's, else the environment's (0 when none)."""
    return dist.get_rank() if is_distributed() else env_rank()


def env_rank() -> int:
    """The rank a cluster or launcher gave this process before any process group exists."""
    for key in ("RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            if key == "SLURM_PROCID" and int(os.environ.get("SLURM_NTASKS", "1") or 1) <= 1:
                return 0
            return int(os.environ[key])
    return 0


def is_rank_zero() -> bool:
    return rank() == 0


# -- collectives ----------------------------------------------------------------------------------
def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _collective(t: torch.Tensor, fn) -> torch.Tensor:
    dev = _comm_device()
    moved = t.to(dev)
    fn(moved)
    return moved.to(t.device)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (no-op when not distributed)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A reduced copy of ``t`` (``sum``, ``mean``, ``min``, ``max``); ``t`` itself when not distributed."""
    if not is_distributed():
        return t
    ops = {
        "sum": dist.ReduceOp.SUM,
        "mean": dist.ReduceOp.SUM,
        "min": dist.ReduceOp.MIN,
        "max": dist.ReduceOp.MAX,
    }
    out = _collective(t.detach().clone(), lambda x: dist.all_reduce(x, op=ops[op]))
    return out / dist.get_world_size() if op == "mean" else out


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s ``t`` (a copy) on every rank."""
    if not is_distributed():
        return t
    return _collective(t.detach().clone(), lambda x: dist.broadcast(x, src=src))


# -- data shares (batches; a training loader's share: qpexp.data.shard) ----------------------------------------------------------------------------------
def set_shard_data(on: bool) -> None:
    """Whether ranks get their share of the data (the trainer's ``use_distributed_sampler``); set by
    :func:`qpexp.run.ranks.ddp_session` for the session."""
    global _SHARD_DATA
    _SHARD_DATA = bool(on)


def rank_batches(batches, n: int):
    """This rank's share of ``n`` batches per rank: batches ``i`` with ``i % world == rank`` among the
    first ``n * world`` (the first ``n`` when not distributed, or when the trainer does not share
    out the data: ``use_distributed_sampler=false``). Together the ranks see what one process sees
    with a batch ``world`` times larger."""
    w, r = (world_size(), rank()) if _SHARD_DATA else (1, 0)
    for i, b in enumerate(batches):
        if i >= n * w:
            break
        if i % w == r:
            yield b


# -- reductions at the points where stages compute from data --------------------------------------
def reduce_weight_grads(model, loader, n_batches: int) -> dict[str, list[torch.Tensor]]:
    """:func:`qpexp.core.prune.criteria.taylor.weight_grads` over this rank's share of the batches
    (:func:`rank_batches`), each batch's gradients averaged across ranks: every rank gets the
    gradients of the global batches (``n_batches`` of them), as one process would with a batch
    ``world`` times larger."""
    if not is_distributed():
        return weight_grads(model, loader, n_batches)
    grads = weight_grads(model, rank_batches(loader, n_batches), n_batches)
    counts = {len(v) for v in grads.values()} or {0}
    m = int(all_reduce(torch.tensor([min(counts)]), "min").item())
    names = sorted(grads)
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for j in range(m):
        flat = torch.cat([grads[n][j].reshape(-1) for n in names]) if names else torch.zeros(0)
        flat = all_reduce(flat, "mean")
        pos = 0
        for n in names:
            g = grads[n][j]
            out[n].append(flat[pos : pos + g.numel()].view_as(g).to(g.dtype))
            pos += g.numel()
    return out


def _masks(model) -> list[tuple[torch.nn.Module, str, torch.Tensor]]:
    return [
        (m, name, buf)
        for m in model.modules()
        for name, buf in m._buffers.items()
        if name.endswith("_mask") and buf is not None
    ]


@torch.no_grad()
def sync_masks(model) -> int:
    """Rank 0's masks on every rank (and the masked weights zeroed); returns how many mask entries
    this rank had differently (0 when the scores were reduced as they should be)."""
    if not is_distributed():
        return 0
    masks = _masks(model)
    if not masks:
        return 0
    flat = torch.cat([b.reshape(-1).float() for _, _, b in masks])
    ref = broadcast(flat)
    differ = int((ref != flat).sum())
    pos = 0
    for m, name, buf in masks:
        buf.copy_(ref[pos : pos + buf.numel()].view_as(buf).to(buf.dtype))
        pos += buf.numel()
        param = m._parameters.get(name[: -len("_mask")])
        if param is not None:
            param.mul_(buf)
    if differ:
        warnings.warn(
            f"DDP: rank {rank()} had {differ} mask entries unlike rank 0's (now rank 0's)",
            QpexpWarning,
            stacklevel=2,
        )
    return differ


def _quantizers(model):
    """Activation range observers ((module, 'range') with min_val/max_val; (module, 'absmax') with
    max_abs) and learned step sizes ((module, 'lsq'))."""
    out = []
    for m in model.modules():
        lsq = getattr(m, "range", None) == "lsq" and isinstance(getattr(m, "scale", None), torch.nn.Parameter)
        if lsq:
            out.append((m, "lsq"))
        elif getattr(m, "is_weight", True):
            continue  # a weight quantizer without learned steps reads its range from the weight
        elif isinstance(getattr(m, "min_val", None), torch.Tensor) and isinstance(
            getattr(m, "max_val", None), torch.Tensor
        ):
            out.append((m, "range"))
        elif isinstance(getattr(m, "max_abs", None), torch.Tensor):
            out.append((m, "absmax"))
    return out


@torch.no_grad()
def sync_quant_state(model, init: bool = False) -> None:
    """Reduce the quantizers' data-dependent state across ranks, in place, identically on every rank.

    Range observers (min/max and EMA): min of the minima, max of the maxima (for EMA exactly the
    update one process makes on the global batch, since every rank starts from the same state);
    scale and zero point recomputed from the reduced range. Log schemes: max of max|x|. With
    ``init`` (after calibration), learned step sizes (LSQ, initialized from each rank's first batch)
    are averaged and their range and zero point reduced likewise; afterwards DDP keeps them equal.
    """
    if not is_distributed():
        return

    qs = [(m, k) for m, k in _quantizers(model) if k != "lsq" or init]
    if not qs:
        return
    parts = []  # one MAX all-reduce: -min, max, max_abs, initialized
    for m, kind in qs:
        if kind == "absmax":
            parts.append(m.max_abs.reshape(-1).float())
        else:
            parts += [-m.min_val.reshape(-1).float(), m.max_val.reshape(-1).float()]
        parts.append(m.initialized.reshape(1).float())
    red = all_reduce(torch.cat(parts), "max")
    lsq = [m for m, k in qs if k == "lsq"]
    scales = all_reduce(torch.cat([m.scale.detach().reshape(-1) for m in lsq]), "mean") if lsq else None
    pos, spos = 0, 0

    def take(t):
        nonlocal pos
        v = red[pos : pos + t.numel()].view_as(t).to(t.dtype)
        pos += t.numel()
        return v

    for m, kind in qs:
        if kind == "absmax":
            m.max_abs.copy_(take(m.max_abs))
        else:
            m.min_val.copy_(-take(m.min_val))
            m.max_val.copy_(take(m.max_val))
        ready = bool(take(m.initialized.reshape(1)).item())
        m.initialized.fill_(ready)
        if kind == "lsq":
            n = m.scale.numel()
            m.scale.copy_(scales[spos : spos + n].view_as(m.scale))
            spos += n
            if ready and not m.symmetric:
                m.zero_point.copy_(affine_qparams(m.min_val, m.max_val, m.bits, False)[1])
        elif kind == "range" and ready:
            scale, zero = affine_qparams(m.min_val, m.max_val, m.bits, m.symmetric)
            m.scale.copy_(scale)
            m.zero_point.copy_(zero)
        if hasattr(m, "_invalidate"):
            m._invalidate()  # Python mirrors of the buffers
        elif hasattr(m, "_ready"):
            m._ready = False


def state_digest(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def finish_stage(stage: str, model) -> dict:
    """After a stage: do all ranks hold the same model? Returns ``{"ddp/<stage>_identical": bool}``
    (nothing when not distributed); ranks that differ take rank 0's state, with a warning. With
    ``$QPEXP_DDP_DUMP`` set, every rank saves its state there as ``<stage>-rank<r>.pt`` (tests)."""
    if not is_distributed():
        return {}
    digests = [None] * world_size()
    dist.all_gather_object(digests, state_digest(model))
    same = len(set(digests)) == 1
    if not same:
        warnings.warn(
            f"DDP: ranks differ after the {stage} stage; using rank 0's model", QpexpWarning, stacklevel=2
        )
        for t in [*model.parameters(), *model.buffers()]:
            t.copy_(broadcast(t))
    dump = os.environ.get(DUMP_ENV)
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        torch.save(clone_state(model), Path(dump) / f"{stage}-rank{rank()}.pt")
    return {f"ddp/{stage}_identical": same}
