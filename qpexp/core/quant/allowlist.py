"""What a graph file (``qpexp.intgraph/1``) may call: one exact table, used by the writer and the reader.

A graph file names the functions and tensor methods its nodes call. Nothing else is ever
resolved: a function is one of the ``(namespace, name)`` pairs of :data:`ALLOWED_FUNCTIONS`, a
method one of :data:`ALLOWED_METHODS` (public tensor methods and the arithmetic dunders of
:data:`ALLOWED_DUNDERS`, called on a tensor node only), an attribute read one of
:data:`GETATTR_OK`; argument literals are JSON values, slices, ``...`` and dtypes, devices and
memory formats from closed sets. :func:`check_nodes` checks every node of a file while it is
read, before anything is built or called, and names the node it refuses.

The exporter (:func:`qpexp.core.quant.graph_export.graph_ir`) uses the same table: a model that
needs a function or method outside it fails at export (``NotImplementedError``), so every file
the project writes loads back. The table holds what the project's models emit (torch.fx traces of
the MLPs, CNNs, ResNets, MobileNets, VGGs, transformers and the test suite's user models) plus
common pure tensor operations; it has no function that reads or writes files, imports code,
changes global state (``torch.set_*``, seeds, threads) or reaches Python objects other than
tensors, sizes and numbers.
"""

from __future__ import annotations

import builtins
import importlib
import keyword
import math
import operator
import re

import torch
import torch.nn.functional as F

# -- the table ------------------------------------------------------------------------------------
_TORCH = """
    abs adaptive_avg_pool1d adaptive_max_pool1d add addmm amax amin argmax argmin avg_pool1d
    baddbmm batch_norm bmm cat chunk clamp clamp_max clamp_min clip concat conv1d conv2d conv3d
    conv_transpose1d conv_transpose2d cos cumsum div dropout einsum eq erf exp expand_copy flatten
    flip floor full_like gather ge gt layer_norm le log log_softmax logsumexp lt
    masked_fill matmul max max_pool1d max_pool2d maximum mean min minimum mm mul narrow ne neg
    norm ones_like permute pow relu reshape roll round rsqrt select sigmoid sin softmax sort split
    sqrt square squeeze stack sub sum t tanh topk transpose tril triu unbind unsqueeze where
    zeros_like
"""
_FUNCTIONAL = """
    adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool1d adaptive_max_pool2d avg_pool1d
    avg_pool2d batch_norm conv1d conv2d conv3d dropout elu gelu group_norm hardsigmoid hardswish
    hardtanh instance_norm layer_norm leaky_relu linear log_softmax max_pool1d max_pool2d
    max_pool3d mish normalize pad relu relu6 scaled_dot_product_attention selu sigmoid silu
    softmax softplus tanh
"""
_C_NN = "elu gelu hardsigmoid hardswish hardtanh leaky_relu linear log_sigmoid silu softplus"
_OPERATOR = """
    abs add and_ eq floordiv ge getitem gt iadd imul invert le lt matmul mod mul ne neg or_ pos
    pow sub truediv xor
"""
_MATH = "ceil floor sqrt prod"

ALLOWED_FUNCTIONS: frozenset[tuple[str, str]] = frozenset(
    [("torch", n) for n in _TORCH.split()]
    + [("torch.nn.functional", n) for n in _FUNCTIONAL.split()]
    + [("torch._C._nn", n) for n in _C_NN.split()]
    + [("operator", n) for n in _OPERATOR.split()]
    + [("math", n) for n in _MATH.split()]
    + [
        ("builtins", "getattr"),  # attribute reads, GETATTR_OK only
        ("torch.fx._symbolic_trace", "_assert_is_none"),  # emitted by traced nn.MultiheadAttention
        ("qpexp.core.quant.traceable", "mask_scores"),  # the attention mask helper
    ]
)
ALLOWED_DUNDERS: frozenset[str] = frozenset(
    """
    __abs__ __add__ __and__ __eq__ __floordiv__ __ge__ __getitem__ __gt__ __iadd__ __imul__
    __invert__ __le__ __lt__ __matmul__ __mod__ __mul__ __ne__ __neg__ __or__ __pos__ __pow__
    __radd__ __rfloordiv__ __rmatmul__ __rmul__ __rpow__ __rsub__ __rtruediv__ __sub__
    __truediv__ __xor__
    """.split()
)
ALLOWED_METHODS: frozenset[str] = ALLOWED_DUNDERS | frozenset(
    """
    abs add amax amin argmax argmin bmm bool chunk clamp clamp_max clamp_min clone contiguous
    cumsum detach dim div double exp expand expand_as flatten flip float gather half int
    log log_softmax long masked_fill matmul max mean min mul narrow ne neg norm numel permute pow
    relu repeat repeat_interleave reshape reshape_as roll rsqrt select sigmoid size softmax sort
    split sqrt squeeze stride sub sum t tanh to topk transpose tril triu type_as unbind unflatten
    unsqueeze view view_as
    """.split()
)
GETATTR_OK: frozenset[str] = frozenset({"shape", "T", "mT", "ndim", "dtype", "device", "data"})

# the only non-tensor values a node can produce: sizes and numbers (methods refuse them as self)
_NUMBER_METHODS = {"size", "dim", "numel", "stride"}
_NUMBER_ATTRS = {"shape", "ndim", "dtype", "device"}

DTYPES = {
    n: getattr(torch, n)
    for n in (
        "float16 float32 float64 bfloat16 half float double int8 int16 int32 int64 uint8 bool "
        "long int short complex64"
    ).split()
}
MEMORY_FORMATS = {n: getattr(torch, n) for n in ("contiguous_format", "channels_last", "preserve_format")}
DEVICE = re.compile(r"(cpu|cuda|meta)(:\d{1,3})?")
_FLOATS = {"inf", "-inf", "nan"}
_NODE_OPS = {"input", "const", "qweight", "quant", "call", "method", "output"}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,200}")


def _namespace(ns: str):
    if ns in ("torch.fx._symbolic_trace", "qpexp.core.quant.traceable"):
        return importlib.import_module(ns)  # only these two fixed modules, never a name from a file
    return {
        "torch": torch,
        "torch.nn.functional": F,
        "torch._C._nn": torch._C._nn,
        "operator": operator,
        "math": math,
        "builtins": builtins,
    }[ns]


def function(qualified: str):
    """The function of an allowed ``namespace.name``; ``ValueError`` for anything else."""
    ns, _, name = str(qualified).rpartition(".")
    if (ns, name) not in ALLOWED_FUNCTIONS:
        raise ValueError(f"the file calls {qualified!r}, which is not allowed")
    return getattr(_namespace(ns), name)


def method(name: str) -> str:
    """``name`` if it is an allowed tensor method; ``ValueError`` for anything else."""
    if name not in ALLOWED_METHODS:
        raise ValueError(f"the file calls tensor method {name!r}, which is not allowed")
    return name


_BY_OBJECT: dict[int, str] = {}


def name_of(fn) -> str | None:
    """The ``namespace.name`` the writer stores for ``fn``, or None if no allowed pair is ``fn``."""
    if not _BY_OBJECT:
        for ns, name in sorted(ALLOWED_FUNCTIONS, key=lambda p: (p[0] != "torch", p)):
            obj = getattr(_namespace(ns), name)
            _BY_OBJECT.setdefault(id(obj), f"{ns}.{name}")
    return _BY_OBJECT.get(id(fn))


# -- checking a file's nodes before anything is built ---------------------------------------------
def _fail(i: int, node, why: str):
    what = node.get("fn") or node.get("name") if isinstance(node, dict) else None
    op = node.get("op") if isinstance(node, dict) else None
    label = f"node {i} ({op} {what!r})" if what else f"node {i} ({op})"
    raise ValueError(f"graph file: {label}: {why}")


def _check_arg(a, i: int, kinds: list, node) -> None:
    if a is None or isinstance(a, (bool, int, float, str)):
        return
    if isinstance(a, list):
        for x in a:
            _check_arg(x, i, kinds, node)
        return
    if not (isinstance(a, dict) and len(a) == 1):
        _fail(i, node, f"argument {a!r} is not a stored value")
    ((k, v),) = a.items()
    if k == "$n":
        if not (type(v) is int and 0 <= v < i and kinds[v] != "out"):
            _fail(i, node, f"argument refers to node {v!r}, not an earlier node")
    elif k in ("$t", "$s"):
        if not isinstance(v, list) or (k == "$s" and len(v) != 3):
            _fail(i, node, f"argument {a!r} is not a stored value")
        for x in v:
            _check_arg(x, i, kinds, node)
    elif k == "$d":
        _check_dict(v, i, kinds, node)
    elif not isinstance(v, (str, int)) or not (
        (k == "$f" and v in _FLOATS)
        or (k == "$e" and v == 1)
        or (k == "$dt" and v in DTYPES)
        or (k == "$mf" and v in MEMORY_FORMATS)
        or (k == "$dev" and isinstance(v, str) and DEVICE.fullmatch(v))
    ):
        _fail(i, node, f"argument {a!r} is not a stored value")


def _check_dict(v, i: int, kinds: list, node) -> None:
    pairs_ok = isinstance(v, list) and all(isinstance(p, list) and len(p) == 2 for p in v)
    if not pairs_ok:
        _fail(i, node, f"argument {v!r} is not a stored dict")
    for key, value in v:
        if not (isinstance(key, str) and key.isidentifier() and not keyword.iskeyword(key)):
            _fail(i, node, f"keyword {key!r} is not a Python identifier")
        _check_arg(value, i, kinds, node)


def _tensor_ref(a, kinds: list) -> bool:
    return isinstance(a, dict) and "$n" in a and kinds[a["$n"]] == "tensor"


def _call_kind(i: int, node, kinds: list) -> str:
    """Check a call/method node; its result: 'tensor' or 'number' (sizes, ints, dtypes)."""
    fn, args = node.get("fn"), node.get("args")
    if not (isinstance(args, dict) and list(args) == ["$t"] and isinstance(node.get("kwargs"), dict)):
        _fail(i, node, "args must be a stored tuple and kwargs a stored dict")
    if list(node["kwargs"]) != ["$d"]:
        _fail(i, node, "kwargs must be a stored dict")
    _check_arg(args, i, kinds, node)
    _check_dict(node["kwargs"]["$d"], i, kinds, node)
    refs = [kinds[a["$n"]] for a in args["$t"] if isinstance(a, dict) and "$n" in a]
    if node["op"] == "method":
        if not (isinstance(fn, str) and fn in ALLOWED_METHODS):
            _fail(i, node, f"tensor method {fn!r} is not allowed")
        self_ = args["$t"][0] if args["$t"] else None
        if not _tensor_ref(self_, kinds):
            _fail(i, node, f"method {fn!r} is called on {self_!r}, not on a tensor node")
        return "number" if fn in _NUMBER_METHODS else "tensor"
    ns, _, name = str(fn).rpartition(".")
    if (ns, name) not in ALLOWED_FUNCTIONS:
        _fail(i, node, f"function {fn!r} is not allowed")
    if (ns, name) == ("builtins", "getattr"):
        obj, attr = args["$t"] if len(args["$t"]) == 2 else (None, None)
        if (
            not isinstance(attr, str)
            or attr not in GETATTR_OK
            or not _tensor_ref(obj, kinds)
            or node["kwargs"]["$d"]
        ):
            _fail(i, node, f"getattr {attr!r} is not allowed (only {sorted(GETATTR_OK)} of a tensor)")
        return "number" if attr in _NUMBER_ATTRS else "tensor"
    if ns == "math" or (ns == "operator" and "tensor" not in refs):
        return "number"
    return "tensor"


def _node_kind(i: int, node, kinds: list) -> str:
    if not isinstance(node, dict) or node.get("op") not in _NODE_OPS:
        _fail(i, node if isinstance(node, dict) else {}, f"unknown node {node!r}")
    op = node["op"]
    if op == "input":
        if not (isinstance(node.get("name"), str) and _NAME.fullmatch(node["name"])):
            _fail(i, node, "an input's name must be an identifier")
    elif op == "quant":
        src = node.get("input")
        if not (type(src) is int and 0 <= src < i and kinds[src] == "tensor"):
            _fail(i, node, f"quantizes {src!r}, not an earlier tensor node")
    elif op in ("call", "method"):
        return _call_kind(i, node, kinds)
    elif op == "output":
        _check_arg(node.get("args"), i, kinds, node)
        return "out"
    return "tensor"


def check_nodes(nodes) -> None:
    """Refuse a node list (a file's JSON nodes, or decoded ones) that calls anything outside the
    table, reads another attribute, calls a method on something other than a tensor node, refers
    to a later node or holds a literal outside the closed sets; the error names the node."""
    if not isinstance(nodes, list):
        raise ValueError("graph file: 'nodes' must be a list")
    kinds: list[str] = []
    for i, node in enumerate(nodes):
        kinds.append(_node_kind(i, node, kinds))


def decode_arg(a, env: list):
    """A checked argument (:func:`check_nodes`) as its Python value (``env``: the built nodes)."""
    if isinstance(a, list):
        return [decode_arg(x, env) for x in a]
    if not isinstance(a, dict):
        return a
    ((k, v),) = a.items()
    if k == "$n":
        return env[v]
    if k == "$t":
        return tuple(decode_arg(x, env) for x in v)
    if k == "$d":
        return {kk: decode_arg(vv, env) for kk, vv in v}
    if k == "$s":
        return slice(*(decode_arg(x, env) for x in v))
    return {
        "$f": lambda: float(v),
        "$e": lambda: Ellipsis,
        "$dt": lambda: DTYPES[v],
        "$mf": lambda: MEMORY_FORMATS[v],
        "$dev": lambda: torch.device(v),
    }[k]()
