"""qpexp: pruning and quantization experiments with an honest accuracy-vs-compression frontier.

The compression core (:mod:`qpexp.core`) has no Lightning, Hydra or W&B imports and can be used
from a notebook; :mod:`qpexp.pipeline` composes it into the three Lightning stages.
"""

__version__ = "0.1.0"
