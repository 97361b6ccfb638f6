"""Old module paths keep importing: ``qpexp.pipeline`` is :mod:`qpexp.run.pipeline`, the same object.

Configs (``_target_: qpexp.archs.resnet20``), cache keys, committed records and user code name modules
by the paths they had before the layout by role (issue 22). :data:`ALIASES` maps each old module to
its new home; :class:`AliasFinder` (installed by ``qpexp/__init__.py``) serves an old name as the new
module object, prefix-wise (``qpexp.archs.resnet`` is ``qpexp.models.resnet``). No file is left at
an old path. Standard library only: everything in qpexp may import this module.

:func:`key_spelling` is the other direction, for cache keys and config hashes: a ``_target_`` spelt
the new way hashes as it was spelt before the move, so that entries and records written before it
stay valid.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# old module -> new module (a prefix: old.sub -> new.sub)
ALIASES = {
    "qpexp.archs": "qpexp.models",
    "qpexp.vision": "qpexp.data.vision",
    "qpexp.core.sensitivity": "qpexp.core.analysis.sensitivity",
    "qpexp.core.mixed": "qpexp.core.analysis.mixed",
    "qpexp.stages": "qpexp.train.stages",
    "qpexp.distill": "qpexp.train.distill",
    "qpexp.optim": "qpexp.train.optim",
    "qpexp.distributed": "qpexp.run._distributed_compat",  # split into qpexp.train.ddp + qpexp.run.ranks
    "qpexp.pipeline": "qpexp.run.pipeline",
    "qpexp.cache": "qpexp.run.cache",
    "qpexp.build": "qpexp.run.build",
    "qpexp.schema": "qpexp.run.schema",
    "qpexp.config_defaults": "qpexp.run.config_defaults",
    "qpexp.analysis": "qpexp.run.analysis",
    "qpexp.deploy_graph": "qpexp.deploy.graph",
    "qpexp.tracking": "qpexp.track.loggers",
    "qpexp.wandb_views": "qpexp.track.wandb_views",
    "qpexp.callbacks": "qpexp.sweep.callbacks",
    "qpexp.frontier": "qpexp.sweep.frontier",
    "qpexp.dashboard": "qpexp.sweep.dashboard",
    "qpexp.report": "qpexp.sweep.report",
    "qpexp.sweepcheck": "qpexp.sweep.check",
}

# the names qpexp.archs exported (its package __init__), now exported by qpexp.models as well; a
# ``_target_`` naming one of them through qpexp.models hashes as qpexp.archs.<name> (the shipped
# configs' spelling before the move)
ARCH_EXPORTS = (
    "GRU",
    "MobileNetV2",
    "ResNet",
    "Transformer",
    "VGG",
    "gru",
    "mobilenetv2",
    "resnet20",
    "resnet32",
    "resnet56",
    "transformer",
    "vgg11",
    "vgg16",
)


def new_name(name: str) -> str:
    """The current module path of ``name`` (an old module path, or a dotted path below one)."""
    for old in sorted(ALIASES, key=len, reverse=True):
        if name == old or name.startswith(old + "."):
            return ALIASES[old] + name[len(old) :]
    return name


_REVERSE = sorted(
    ((new, old) for old, new in ALIASES.items() if old != "qpexp.archs"), key=lambda p: -len(p[0])
)


def old_target(target: str) -> str:
    """A dotted ``_target_`` as it was spelt before the move (unchanged when it did not move)."""
    head, _, attr = target.rpartition(".")
    if head == "qpexp.models" and attr in ARCH_EXPORTS:
        return f"qpexp.archs.{attr}"
    for new, old in _REVERSE:
        if target == new or target.startswith(new + "."):
            return old + target[len(new) :]
    if target.startswith("qpexp.models.") and head != "qpexp.models":  # qpexp.models.resnet.ResNet
        return "qpexp.archs." + target[len("qpexp.models.") :]
    return target


def key_spelling(obj):
    """``obj`` (plain containers) with every ``_target_`` string spelt as before the move."""
    if isinstance(obj, dict):
        return {
            k: old_target(v) if k == "_target_" and isinstance(v, str) else key_spelling(v)
            for k, v in obj.items()
        }
    if isinstance(obj, (list, tuple)):
        return type(obj)(key_spelling(v) for v in obj)
    return obj


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, name: str, target: str):
        self.name, self.target = name, target
        self.spec = None

    def create_module(self, spec):
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module) -> None:
        module.__spec__ = self.spec  # the import system set the alias's spec on the shared module object
        # the submodules loaded already, under the old name too: importing ``qpexp.archs.gru`` then
        # finds it in sys.modules instead of loading it again, which would set the package's
        # attribute ``gru`` (the builder function ``qpexp.models`` exports) to the submodule
        for name, sub in list(sys.modules.items()):
            if name.startswith(self.target + "."):
                sys.modules.setdefault(self.name + name[len(self.target) :], sub)

    def get_code(self, fullname):
        """``python -m <old name>`` (runpy): the new module's code, run as ``__main__``."""
        return importlib.util.find_spec(self.target).loader.get_code(self.target)


class AliasFinder(importlib.abc.MetaPathFinder):
    """Finds an old module path and loads it as the new module (one module object, two names)."""

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith("qpexp."):
            return None
        new = new_name(fullname)
        if new == fullname:
            return None
        if importlib.util.find_spec(new) is None:
            return None
        return importlib.util.spec_from_loader(fullname, _AliasLoader(fullname, new))


def install() -> None:
    if not any(isinstance(f, AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, AliasFinder())
