"""The ``qpexp`` command: a Hydra app whose config root is the package's ``conf/``."""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qpexp.errors import SAVED_FULL_ERROR, error_line, is_user_error, report
from qpexp.run.config_defaults import config_dir
from qpexp.run.schema import check_data_path, validate
from qpexp.track.loggers import make_tracker
from qpexp.train.ddp import env_rank

log = logging.getLogger("qpexp")
SWEEPER_PLUGIN = "hydra_plugins.qpexp_optuna_sweeper"
LAUNCHER_PLUGIN = "hydra_plugins.qpexp_submitit_launcher"


def point_dirname(override_dirname: str) -> str:
    """A sweep point's folder name from its overrides: no path separators, at most ~120 characters."""
    import hashlib

    name = override_dirname.replace("/", "_").replace("\\", "_") or "default"
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


if not OmegaConf.has_resolver("qpexp_point"):
    OmegaConf.register_new_resolver("qpexp_point", point_dirname)


def register_plugins() -> None:
    """qpexp's Hydra sweeper (``hydra/sweeper=qpexp_optuna``, ``sweep=optuna``) and SLURM launcher
    (``hydra/launcher=slurm``), registered here too: Hydra's plugin scan does not see a namespace
    package that an editable install maps. Loaded by name, as Hydra's scan loads plugins: the plugins
    sit above qpexp (they import qpexp, never the reverse; ``.importlinter``)."""
    from hydra.core.plugins import Plugins

    importlib.import_module(f"{SWEEPER_PLUGIN}.config")  # the config group option
    Plugins.instance().register(
        importlib.import_module(f"{SWEEPER_PLUGIN}.optuna_sweeper").QpexpOptunaSweeper
    )
    Plugins.instance().register(importlib.import_module(f"{LAUNCHER_PLUGIN}.submitit_launcher").SlurmLauncher)


register_plugins()


def summary_table(record: dict) -> str:
    head = (
        f"{'stage':<9} {'val acc':>8} {'test acc':>8} {'sparsity':>8} {'bits w/a':>9} "
        f"{'size bits':>10} {'ratio':>7} {'seconds':>8}"
    )
    lines = [head, "-" * len(head)]
    for stage in ("baseline", "prune", "qat", "final"):
        if f"{stage}/test_acc" not in record:
            continue
        r = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith(f"{stage}/")}
        if "size_bits" not in r:
            continue
        seconds = record.get("seconds/total" if stage == "final" else f"seconds/{stage}", 0)
        hit = " (cached)" if record.get(f"cache/{stage}_hit") else ""
        lines.append(
            f"{stage:<9} {r['val_acc']:>8.4f} {r['test_acc']:>8.4f} {r['sparsity']:>8.3f} "
            f"{r['bits_w']:>4.3g}/{r['bits_a']:<4g} {r['size_bits']:>10,} {r['compression_ratio']:>6.2f}x "
            f"{seconds:>8.1f}{hit}"
        )
    if "deploy/onnx_test_acc" in record:
        lines.append(
            f"onnxruntime test acc {record['deploy/onnx_test_acc']:.4f} "
            f"({record['deploy/onnx_integer_kernels']} integer kernels)"
        )
    status = record.get("status", "unknown")
    reason = record.get("error") or record.get("status_reason")
    lines.append(f"status: {status}" + (f" ({reason})" if status != "ok" and reason else ""))
    return "\n".join(lines)


def run_job(cfg: DictConfig) -> dict:
    """One point: validate, build the pipeline (or find its complete record), run it on this rank,
    write the record and the tracker's summary, whatever happens."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    prepared = _prepare(cfg, run_dir, multirun)
    if isinstance(prepared, dict):  # a complete record, or the failed record of a bad config
        return prepared
    pipeline, record = prepared
    from qpexp.run.ranks import ddp_session

    # a DDP rank that the cluster started (SLURM tasks, torchrun): trains along, writes nothing
    if env_rank() != 0:
        pipeline.cfg.export.enabled = False
        with ddp_session(pipeline):
            return pipeline.run()
    return _run_rank_zero(pipeline, record, hc, run_dir, multirun)


def _prepare(cfg: DictConfig, run_dir: Path, multirun: bool):
    """``(pipeline, record)``; or a record to return at once: the complete one already on disk, or a
    failed one for a user error (the schema, targets, the data file: all before Lightning loads)."""
    try:
        typed = validate(cfg)
        check_data_path(typed.data)  # schema, targets, data file: before Lightning is imported
        from qpexp.run.pipeline import Pipeline, base_record, complete_record  # Lightning

        done = complete_record(run_dir, cfg)
        if done is not None:
            log.info("%s: complete record found, nothing to run", run_dir)
            return done
        record = base_record(cfg)
        return Pipeline(cfg, run_dir, typed=typed), record  # validated once per point
    except Exception as e:
        if not is_user_error(e):
            raise
        if not multirun:
            report(e)  # one line, exit 2 (the traceback under HYDRA_FULL_ERROR=1)
        from qpexp.run.pipeline import base_record, write_record

        try:
            record = base_record(cfg)
        except Exception:  # the config does not even resolve
            record = {}
        record.update(status="failed", error=f"{type(e).__name__}: {error_line(e)}")
        write_record(run_dir, record)
        return record


def _run_rank_zero(pipeline, record: dict, hc, run_dir: Path, multirun: bool) -> dict:
    """Run the pipeline with its tracker; the record is written even when the run fails."""
    from qpexp.run.pipeline import write_record
    from qpexp.run.ranks import ddp_session

    name = hc.job.override_dirname or None
    sweep = Path(hc.sweep.dir).name if multirun else None  # the W&B group unless logger.group is set
    tracker = make_tracker(
        pipeline.cfg.logger, run_dir, OmegaConf.to_container(pipeline.cfg), name=name, sweep=sweep
    )
    pipeline.logger = tracker.logger
    ok = False
    try:
        with ddp_session(pipeline) as ddp:  # trainer=ddp: starts (or joins) the other ranks
            record.update(pipeline.run())
            record.update(ddp.record())
        ok = True
    except Exception as e:
        user = is_user_error(e)  # bad data, a model that refuses the data's shape, ...
        record.update(status="failed", error=f"{type(e).__name__}: {error_line(e) if user else e}")
        if not user:
            log.exception("run failed")
        if not multirun:
            if user:
                report(e)  # after `finally` has written the record
            raise
    finally:
        write_record(run_dir, record)
        tracker.summary(record)
        if ok:
            tracker.log_layers(record)
        tracker.finish(ok)
    print(summary_table(record), flush=True)
    return record


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def hydra_main(cfg: DictConfig) -> dict:
    return run_job(cfg)


def main() -> None:
    """The ``qpexp`` command: the Hydra app, with config, override and data errors in one line.

    Hydra prints a composition error (an unknown key, group option or override syntax) over several
    lines, a job's error with its traceback. With ``HYDRA_FULL_ERROR`` set for the call, Hydra
    re-raises instead, and :func:`qpexp.errors.report` prints ``qpexp: error: ...`` and exits 2,
    or re-raises for the full traceback when the user set ``HYDRA_FULL_ERROR=1`` themselves.
    """
    saved = {k: os.environ.get(k) for k in ("HYDRA_FULL_ERROR", SAVED_FULL_ERROR)}
    os.environ[SAVED_FULL_ERROR] = os.environ.get("HYDRA_FULL_ERROR", "")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except Exception as e:
        report(e)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    main()
