"""qpexp: pruning and quantization experiments with an honest accuracy-vs-compression frontier.

The compression core (:mod:`qpexp.core`) has no Lightning, Hydra or W&B imports and can be used
from a notebook; :mod:`qpexp.run.pipeline` composes it into the three Lightning stages. The layout by
role and its layers: ``docs/architecture.md``. Old module paths (``qpexp.pipeline``,
``qpexp.archs.resnet20``, ...) keep importing: :mod:`qpexp._aliases`.
"""

from qpexp import _aliases

__version__ = "0.1.0"

_aliases.install()
