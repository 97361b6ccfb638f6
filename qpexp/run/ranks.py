"""Starting the ranks of a data-parallel run (``trainer=ddp``), and the stage cache as every rank sees it.

Ranks are started in one of two ways:

- **by qpexp** (one process per job, the default): rank 0 starts ``devices - 1`` copies of itself
  (``python -m qpexp.run.ranks``, the resolved config on stdin) on this node;
- **by the cluster** (SLURM tasks, ``torchrun``): every process runs ``qpexp``; the ranks come from
  the environment (``RANK``/``WORLD_SIZE`` or ``SLURM_PROCID``/``SLURM_NTASKS``); ranks other than 0
  train along and write nothing.

The cache as every rank sees it: :mod:`qpexp.run.rank_cache`; what keeps the ranks' models identical:
:mod:`qpexp.train.ddp`.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from qpexp.errors import ConfigError
from qpexp.run.pipeline import Pipeline
from qpexp.run.schema import plain_config
from qpexp.train.ddp import set_shard_data

log = logging.getLogger("qpexp")

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK", "NODE_RANK", "OMP_NUM_THREADS")
STARTED_ENV, JOINED_KEY = "QPEXP_STARTED_RANK", "qpexp/joined"  # ranks qpexp started, and who joined
TIMEOUT_ENV = "QPEXP_DDP_TIMEOUT_S"  # collective timeout (rank 0 may wait on a cache lock meanwhile)


# -- which world the trainer asks for -------------------------------------------------------------
def _ddp_strategy(strategy) -> bool:
    s = str(strategy or "").lower()
    return s.startswith("ddp") and not any(w in s for w in ("spawn", "fork", "notebook"))


def requested_world(trainer_cfg: dict) -> int:
    """Processes a DDP trainer config asks for (devices x num_nodes); 1 for any other strategy."""
    if not _ddp_strategy(trainer_cfg.get("strategy")):
        return 1
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        n = len(devices)
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        n = int(devices)
    elif isinstance(devices, int):
        n = devices
    else:  # "auto"
        n = -1
    if n < 0:
        n = torch.cuda.device_count() if _uses_cuda(trainer_cfg) else 1
    return max(n, 1) * int(trainer_cfg.get("num_nodes", 1) or 1)


def _uses_cuda(trainer_cfg: dict) -> bool:
    acc = str(trainer_cfg.get("accelerator", "auto")).lower()
    return acc in ("gpu", "cuda", "auto") and torch.cuda.is_available()


def _external_world() -> tuple[int, int, int] | None:
    """(rank, local rank, world size) when a cluster or launcher started the ranks (SLURM tasks,
    torchrun), else None."""
    env = os.environ
    if env.get("WORLD_SIZE", "").isdigit() and env.get("RANK", "").isdigit() and "LOCAL_RANK" in env:
        return int(env["RANK"]), int(env["LOCAL_RANK"]), int(env["WORLD_SIZE"])
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_PROCID", "").isdigit():
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)), int(env["SLURM_NTASKS"])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, 6 * 3600)))


# -- the session: start or join the ranks, tear them down -----------------------------------------
class Session:
    """What :func:`ddp_session` yields: the world and, on rank 0, the ranks it started."""

    def __init__(self, world: int = 1, procs=None, saved_env=None):
        self.world, self.procs, self.saved_env = world, procs or [], saved_env or {}
        self.store = None  # rank 0's rendezvous store while the ranks it started join

    def record(self) -> dict:
        return {"ddp/world_size": self.world} if self.world > 1 else {}


@contextmanager
def ddp_session(pipeline):
    """Around ``pipeline.run()``: when the trainer asks for DDP over several processes, start (or
    join) the ranks and the process group, and end them afterwards. Single-process: does nothing."""
    world = requested_world(pipeline.trainer_cfg)
    if world <= 1 or dist.is_initialized():
        yield Session()
        return
    backend = "nccl" if _uses_cuda(pipeline.trainer_cfg) else "gloo"
    ext = _external_world()
    if ext is None:
        _check_local_world(pipeline.trainer_cfg, world, backend)
    session = Session(world, saved_env={k: os.environ.get(k) for k in ENV_KEYS})
    # Lightning sets torch's thread count to cores / processes unless OMP_NUM_THREADS is set: keep qpexp's
    os.environ.setdefault(
        "OMP_NUM_THREADS", str(getattr(pipeline, "threads", None) or torch.get_num_threads())
    )
    if ext is not None:  # SLURM tasks, torchrun, or a rank started by rank 0 (below)
        r, local, world = ext
        session.world = world
        addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
        if not (addr and port):
            from lightning.fabric.plugins.environments import SLURMEnvironment

            env = SLURMEnvironment()
            addr, port = env.main_address, env.main_port
    else:  # rank 0 of a job: start the other ranks on this node
        r, local, addr, port = 0, 0, "127.0.0.1", _free_port()
        env = {"MASTER_ADDR": addr, "MASTER_PORT": str(port), "WORLD_SIZE": str(world), "NODE_RANK": "0"}
        session.procs = _start_ranks(pipeline, world, env)
        os.environ.update(env, RANK="0", LOCAL_RANK="0")  # Lightning then joins instead of spawning
    set_shard_data(pipeline.trainer_cfg.get("use_distributed_sampler", True))
    ok = False
    try:
        warnings.filterwarnings("ignore", ".*sync_dist=True.*")  # epoch losses are each rank's own
        if backend == "nccl":
            torch.cuda.set_device(local)
        _rendezvous(session, addr, int(port))
        dist.init_process_group(
            backend, init_method=f"tcp://{addr}:{port}", rank=r, world_size=world, timeout=_timeout()
        )
        session.store = None
        log.info("DDP: rank %d of %d (%s)", r, world, backend)
        yield session
        dist.barrier()
        ok = True
    finally:
        if not ok:  # a failed rank 0 leaves its ranks waiting in a collective
            for p in session.procs:
                if p.poll() is None:
                    p.kill()
        if dist.is_initialized():
            dist.destroy_process_group()
        set_shard_data(True)
        _end(session, ok)


def _check_local_world(trainer_cfg: dict, world: int, backend: str) -> None:
    """The ranks qpexp starts itself live on this node (one GPU each with NCCL)."""
    if int(trainer_cfg.get("num_nodes", 1) or 1) > 1:
        raise ConfigError(
            "trainer.num_nodes > 1 needs one process per device started by the cluster "
            "(SLURM: hydra.launcher.tasks_per_node=DEVICES, hydra.launcher.nodes=NODES; or torchrun)"
        )
    if backend == "nccl" and torch.cuda.device_count() < world:
        raise ConfigError(f"trainer.devices={world}: this node has {torch.cuda.device_count()} GPU(s)")


def rank_env(env: dict) -> dict:
    """The environment of a rank qpexp starts: ``env`` over this process's, with the folder that holds
    the ``qpexp`` this process imported first on ``PYTHONPATH``. Without it, a folder named ``qpexp``
    in the working directory (a run directory, say) shadows an editable install: Python finds it as a
    namespace package before the editable install's finder is asked, and the rank dies at import
    while rank 0 waits for it."""
    root = str(Path(__file__).resolve().parents[2])
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != root]
    return {**os.environ, **env, "PYTHONPATH": os.pathsep.join([root, *path])}


def _store(addr: str, port: int, master: bool) -> dist.TCPStore:
    """The rendezvous store (one server per process and port: ``init_process_group`` reuses it)."""
    return dist.TCPStore(
        addr, port, is_master=master, wait_for_workers=False, multi_tenant=True, timeout=_timeout()
    )


def _rendezvous(session: Session, addr: str, port: int) -> None:
    """Before the group's rendezvous, between rank 0 and the ranks it started: rank 0 waits until each
    has reached the store, and a rank that dies first (an import error, memory) is an error here, not
    a wait of ``QPEXP_DDP_TIMEOUT_S``. The store stays open (``session.store``) until the group is up."""
    if os.environ.pop(STARTED_ENV, None):  # a rank qpexp started: say it lives
        _store(addr, port, master=False).add(JOINED_KEY, 1)
    if not session.procs:
        return
    session.store = _store(addr, port, master=True)
    while session.store.add(JOINED_KEY, 0) < len(session.procs):
        dead = [(i + 1, p.returncode) for i, p in enumerate(session.procs) if p.poll() is not None]
        if dead:
            raise RuntimeError(f"DDP: rank(s) {dead} (rank, exit status) exited before joining")
        time.sleep(0.1)


def _start_ranks(pipeline, world: int, env: dict) -> list[subprocess.Popen]:
    spec = json.dumps({"config": plain_config(pipeline.raw), "run_dir": str(pipeline.run_dir)})
    procs = []
    for r in range(1, world):
        e = {**rank_env(env), "RANK": str(r), "LOCAL_RANK": str(r), STARTED_ENV: "1"}
        p = subprocess.Popen([sys.executable, "-m", "qpexp.run.ranks"], stdin=subprocess.PIPE, env=e)
        p.stdin.write(spec.encode())
        p.stdin.close()
        procs.append(p)
    return procs


def _end(session: Session, ok: bool) -> None:
    failed = []
    for p in session.procs:
        try:
            code = p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            code = p.wait()
        if code != 0:
            failed.append(code)
    for k, v in session.saved_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if failed and ok:
        raise RuntimeError(f"DDP: {len(failed)} rank(s) exited with status {failed}")


def _rank_main() -> None:
    """A rank started by rank 0: the same pipeline on the same run folder; writes nothing."""
    spec = json.loads(sys.stdin.read())
    cfg = OmegaConf.create(spec["config"])
    cfg.export.enabled = False  # integer/ONNX files are rank 0's
    pipeline = Pipeline(cfg, spec["run_dir"])
    with ddp_session(pipeline):
        pipeline.run()


if __name__ == "__main__":  # the module's own copy: run the imported one (one set of module globals)
    from qpexp.run.ranks import _rank_main as rank_main

    rank_main()
