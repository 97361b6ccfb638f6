"""The ``qpexp`` command: a Hydra app whose config root is the package's ``conf/``."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("qpexp")


def config_dir() -> str:
    """``qpexp/conf`` in an installed wheel, the repository's top-level ``conf/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for c in (here / "conf", here.parent / "conf"):
        if (c / "config.yaml").is_file():
            return str(c)
    raise RuntimeError(f"qpexp: no conf/ folder found next to {here}")


def point_dirname(override_dirname: str) -> str:
    """A sweep point's folder name from its overrides: no path separators, at most ~120 characters."""
    import hashlib

    name = override_dirname.replace("/", "_").replace("\\", "_") or "default"
    if len(name) > 120:
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


if not OmegaConf.has_resolver("qpexp_point"):
    OmegaConf.register_new_resolver("qpexp_point", point_dirname)


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
            f"{r['bits_w']:>4g}/{r['bits_a']:<4g} {r['size_bits']:>10,} {r['compression_ratio']:>6.2f}x "
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
    from qpexp.data import DataError
    from qpexp.pipeline import Pipeline, base_record, complete_record, write_record
    from qpexp.schema import ConfigError
    from qpexp.tracking import make_tracker

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    done = complete_record(run_dir, cfg)
    if done is not None:
        log.info("%s: complete record found, nothing to run", run_dir)
        return done
    record = base_record(cfg)
    try:
        pipeline = Pipeline(cfg, run_dir)
    except ConfigError as e:
        if multirun:
            record.update(status="failed", error=f"ConfigError: {e}")
            write_record(run_dir, record)
            return record
        print(f"qpexp: error: {e}", file=sys.stderr)
        sys.exit(2)
    name = hc.job.override_dirname or None
    tracker = make_tracker(pipeline.cfg.logger, run_dir, OmegaConf.to_container(pipeline.cfg), name=name)
    pipeline.logger = tracker.logger
    ok = False
    try:
        record.update(pipeline.run())
        ok = True
    except (ConfigError, DataError) as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        if not multirun:
            print(f"qpexp: error: {e}", file=sys.stderr)
            sys.exit(2)
    except Exception as e:
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        log.exception("run failed")
        if not multirun:
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
def main(cfg: DictConfig) -> dict:
    return run_job(cfg)


if __name__ == "__main__":
    main()
