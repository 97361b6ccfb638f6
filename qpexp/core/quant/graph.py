"""Graph-level quantization: one torch.fx pass that works for any traceable model.

Why torch.fx and not torch.export: QAT trains the prepared model in place, as an ``nn.Module``
whose parameters, masks (``<param>_mask`` buffers) and ``state_dict`` keys stay those of the user's
model, with Lightning, the optimizer and checkpoints holding on to the same objects. ``fx.symbolic_trace``
records Python-level calls with a *chosen* set of leaf modules (conv/linear wrappers, torch.nn
layers, quantizers), so the graph names the very submodules and parameters of the model, and the
instrumented graph compiles back into an ordinary forward over them. ``torch.export`` captures an
aten-level, functionalized program: modules are inlined, parameters are lifted into inputs, the
result is an ``ExportedProgram`` that is not trained in place, and a QAT flow built on it
(``prepare_qat_pt2e``) returns a new ``GraphModule`` with other parameter names, which would break
the cache, checkpoint and mask bookkeeping. fx's limit (no data-dependent Python control flow) is
handled by making the failing submodule a leaf and retrying (its internal ops then stay float and
are listed), and every trace is checked against the eager forward on the example batch.

What :func:`prepare` does (``quantize_`` calls it):

1. :func:`qpexp.core.quant.traceable.make_traceable_`: ``nn.MultiheadAttention`` and the torch
   transformer layers get a forward in plain ops (same parameters, same results).
2. Trace with conv/linear/torch.nn layers as leaves. **BatchNorm folding**: every ``call_module``
   BatchNorm whose input is a ``call_module`` conv used by nothing else (each called once) is folded
   into that conv, in any model (the arithmetic of :func:`qpexp.core.quant.layers.fold_pair`).
3. **Raw weights**: a floating ``nn.Parameter`` (2-D or more) that reaches the weight slot of
   ``F.linear``/``F.conv*`` or an operand of a matmul, directly or through view ops (chunk,
   getitem, transpose, ...), is a weight: e.g. ``in_proj_weight``. It gets a weight quantizer
   ``<owner>.<param>_wq`` (per output channel along the axis the consumer reads as output), with
   its bit width from ``first_bits``/``last_bits``/``overrides`` like a layer's (its name is
   ``<owner>.<param>``); its pruning mask stays the buffer ``<owner>.<param>_mask``.
4. After conv/linear layers are wrapped in :class:`QuantLayer`, trace again (train and eval mode)
   and insert activation quantizers where an integer runtime needs an integer operand:

   * ``add``/``sub`` (also ``+=``), ``mul`` of two tensors, ``matmul``/``bmm``/``einsum``
     (``q @ k^T``, ``attn @ v``), the input of ``F.linear``/``F.conv*`` with a raw weight: every
     floating tensor operand (one quantizer per tensor, shared by all such consumers);
   * average pooling (``AvgPool*``/``AdaptiveAvgPool*`` modules, ``F.avg_pool*``,
     ``F.adaptive_avg_pool*``, ``mean``): the input;
   * ``cat``/``stack``: one quantizer on the output. Quantization is elementwise, so
     ``q(cat(a, b)) == cat(q(a), q(b))`` with one shared scale: this *is* the shared-scale input
     quantization integer concatenation needs, observed once per step.

   Quantizers are submodules of the module whose forward contains the op (the nearest one that
   is not a container), named ``<op>_q<i>`` (input ``i``) or ``<op>_q`` (output); a pooling
   module's input quantizer is its own ``input_q`` (so an ``nn.Sequential`` never gains a child).
   Checkpoints of prepared models load into freshly prepared ones. When, in every graph, a raw
   weight's quantized value is the whole weight of exactly one ``F.linear`` call, its quantizer
   records that call's input (:class:`LinearInput`, :func:`link_linear_inputs`), for one-shot
   rounding (GPTQ) to calibrate on.
5. The instrumented graph becomes the model's forward (a per-instance subclass of the model's own
   class; a different graph for eval mode when the model's forward depends on ``self.training``).
   Nothing is installed when no graph-level quantizer was needed (plain ``nn.Sequential`` models:
   their behaviour is exactly the per-layer one). Submodules keep their own forward.

Everything else that computes values stays in float and is listed by :func:`float_ops`
(``softmax``, ``LayerNorm``, ``GELU``, unfolded BatchNorm, ...); view/shape ops, ReLU, max pooling,
dropout and multiplication by a constant commute with quantization or rescale it, and are not.
"""

from __future__ import annotations

import inspect
import linecache
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn

from qpexp.core.quant.layers import QuantLayer, fold_pair
from qpexp.core.quant.spec import SCHEMES, QuantConfig, QuantSpec
from qpexp.core.quant.traceable import make_traceable_
from qpexp.core.resolve import resolve
from qpexp.core.warning import QpexpWarning

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
POOL_MODULES = (
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
PASS_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.Hardtanh,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
)

# ops by name (call_function: the function's __name__; call_method: the method name)
ADD = {"add", "iadd", "sub", "isub", "add_", "sub_", "__add__", "__radd__", "__sub__", "__rsub__"}
MUL = {"mul", "imul", "mul_", "multiply", "__mul__", "__rmul__"}
CAT = {"cat", "concat", "concatenate", "stack"}
MATMUL = {"matmul", "bmm", "mm", "baddbmm", "einsum", "__matmul__", "__rmatmul__"}
FLINEAR = {"linear", "conv1d", "conv2d", "conv3d"}  # functional, weight in arg 1
POOL = {
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "mean",
}
VIEW = {
    "getitem",
    "view",
    "reshape",
    "flatten",
    "unflatten",
    "permute",
    "transpose",
    "t",
    "contiguous",
    "squeeze",
    "unsqueeze",
    "expand",
    "expand_as",
    "repeat",
    "chunk",
    "split",
    "unbind",
    "narrow",
    "select",
    "clone",
    "detach",
}
TRANSPOSING = {"t", "transpose", "permute"}
PASS = VIEW | {
    "getattr",
    "size",
    "dim",
    "numel",
    "relu",
    "relu_",
    "relu6",
    "hardtanh",
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "adaptive_max_pool3d",
    "dropout",
    "to",
    "float",
    "type_as",
    "_assert_is_none",
}
SHAPE_METHODS = {"size", "dim", "numel", "stride", "__len__", "item", "tolist"}
MAX_LEAF_RETRIES = 8


def is_quantizer(m) -> bool:
    """A fake quantizer module (duck-typed, so a user's scheme counts too)."""
    return isinstance(m, nn.Module) and hasattr(m, "n_qparams") and hasattr(m, "int_repr")


def _quant_layer_cls():
    return QuantLayer


def op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """The op a node computes: the module's class name, the function's or the method's name."""
    if node.op == "call_module":
        return type(modules[node.target]).__name__
    if node.op == "call_method":
        return str(node.target)
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    return node.op


class Tracer(fx.Tracer):
    """fx tracer with qpexp's leaves.

    Quantizers and ``leaves`` (full paths of modules that could not be traced) are always leaves.
    ``mode="inline"``: torch.nn layers, conv/linear and :class:`QuantLayer` are leaves; every other
    module is traced through (one flat graph: BN folding, raw weights, the check against eager).
    ``mode="prepare"``: the same leaves, but a user module (or traceable equivalent) is also called
    as a module and its call site recorded in ``sites``: it gets its own graph (see :func:`build`).
    ``mode="export"``: everything but quantizers is traced down to torch functions, BatchNorm in
    eval mode as ``F.batch_norm``. Containers (Sequential, ModuleList, ModuleDict) are always
    traced through.
    """

    def __init__(
        self,
        mode: str = "inline",
        leaves: set[str] | None = None,
        prefix: str = "",
        ranks: dict | None = None,
        input_ranks: list | None = None,
    ):
        super().__init__()
        self.mode = mode
        self.leaves = set(leaves or ())
        self.prefix = prefix
        self.sites: list[tuple[str, nn.Module, tuple, dict]] = []
        self.ranks = ranks or {}  # module path -> ranks of its tensor arguments on the example
        self.input_ranks = list(input_ranks or ())
        self._placeholders = 0

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _RankedProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, *rest, **kw):
        p = super().create_proxy(kind, target, args, kwargs, *rest, **kw)
        if kind == "placeholder":
            j = self._placeholders
            self._placeholders += 1
            if j < len(self.input_ranks) and self.input_ranks[j] is not None:
                p.node.meta["qpexp_ndim"] = self.input_ranks[j]
        return p

    def _annotate_ranks(self, m: nn.Module, qualname: str, args, kwargs) -> None:
        """A module's tensor arguments get the ranks seen on the example (``x.dim()`` is then an int)."""
        ranks = self.ranks.get(self.full(qualname))
        if not ranks:
            return
        try:
            leaves, _ = pytree.tree_flatten(_bind(type(m).forward, m, args, kwargs))
        except TypeError:
            return
        proxies = list({id(p): p for p in leaves if isinstance(p, fx.Proxy)}.values())
        if len(proxies) == len(ranks):
            for p, r in zip(proxies, ranks):
                p.node.meta.setdefault("qpexp_ndim", r)

    def full(self, qualname: str) -> str:
        return f"{self.prefix}.{qualname}" if self.prefix and qualname else self.prefix or qualname

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if is_quantizer(m) or self.full(qualname) in self.leaves:
            return True
        if self.mode == "export" or isinstance(m, CONTAINERS):
            return False
        if isinstance(m, _quant_layer_cls()) or _is_torch_layer(m):
            return True
        return self.mode == "prepare"

    def call_module(self, m, forward, args, kwargs):
        qualname = self.path_of_module(m)
        self._annotate_ranks(m, qualname, args, kwargs)
        if (
            self.mode == "export"
            and isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not self.is_leaf_module(m, qualname)
        ):
            if m.training or m.running_mean is None:
                raise NotImplementedError(f"{self.full(qualname)}: BatchNorm without running statistics")

            def attr(n):
                return (
                    None
                    if getattr(m, n) is None
                    else self.create_proxy("get_attr", f"{qualname}.{n}", (), {})
                )

            return F.batch_norm(
                args[0],
                attr("running_mean"),
                attr("running_var"),
                attr("weight"),
                attr("bias"),
                False,
                0.0,
                m.eps,
            )
        if (
            self.mode == "prepare"
            and not isinstance(m, CONTAINERS)
            and not is_quantizer(m)
            and not isinstance(m, _quant_layer_cls())
            and not _is_torch_layer(m)
            and self.full(qualname) not in self.leaves
        ):
            self.sites.append((qualname, m, args, kwargs))
        return super().call_module(m, forward, args, kwargs)


class _RankedProxy(fx.Proxy):
    """A proxy whose rank is known when the example showed it: a forward may branch on
    ``x.dim()``/``x.ndim`` (the rank is baked in; the installed graph checks it on every call)."""

    def dim(self):
        nd = self.node.meta.get("qpexp_ndim")
        return nd if nd is not None else self.__getattr__("dim")()

    @property
    def ndim(self):
        nd = self.node.meta.get("qpexp_ndim")
        return nd if nd is not None else self.__getattr__("ndim")


def record_ranks(model: nn.Module, example):
    """Per module path, the ranks of the tensor arguments of its first call on ``example``; and
    the model's output (eval mode)."""
    ranks: dict[str, list[int]] = {}
    names = {id(m): n for n, m in model.named_modules()}

    def hook(m, args, kwargs):
        name = names.get(id(m))
        if name is None or name in ranks:
            return
        try:
            leaves, _ = pytree.tree_flatten(_bind(type(m).forward, m, args, kwargs))
        except TypeError:
            return
        ranks[name] = [t.dim() for t in {id(t): t for t in leaves if isinstance(t, torch.Tensor)}.values()]

    hooks = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    try:
        out = _eager(model, example)
    finally:
        for h in hooks:
            h.remove()
    return ranks, out


def _is_torch_layer(m: nn.Module) -> bool:
    """A torch.nn layer (conv, BN, LayerNorm, activation, pooling, ...): a leaf unless it has a
    traceable equivalent (whose class lives in qpexp)."""
    mod = type(m).__module__
    return mod.startswith("torch.nn") or mod.startswith("torch.ao.nn")


# -- call sites: how a parent calls a module --------------------------------------------------------
@dataclass(frozen=True)
class _Ph:
    """Placeholder ``j`` in a call pattern."""

    j: int


@dataclass
class Site:
    """How a module is called: its bound arguments as pytrees whose tensor leaves are placeholders
    (``_Ph``; the same object twice is the same placeholder) and other leaves constants."""

    spec: object  # pytree spec of the bound arguments (a dict name -> value)
    leaves: list  # _Ph or constant
    n_inputs: int
    kinds: list  # Kind per placeholder
    ranks: list = field(default_factory=list)  # rank per placeholder on the example (None: unknown)

    def same(self, other: Site) -> bool:
        return (
            self.spec == other.spec
            and len(self.leaves) == len(other.leaves)
            and all(
                (isinstance(a, _Ph) and isinstance(b, _Ph) and a == b) or _same_const(a, b)
                for a, b in zip(self.leaves, other.leaves)
            )
        )

    def match(self, arguments: dict) -> list | None:
        """The placeholder values of a call with these bound arguments, or None if it is another call."""
        leaves, spec = pytree.tree_flatten(arguments)
        if spec != self.spec:
            return None
        vals: list = [_UNSET] * self.n_inputs
        for want, got in zip(self.leaves, leaves):
            if isinstance(want, _Ph):
                if vals[want.j] is _UNSET:
                    vals[want.j] = got
                elif vals[want.j] is not got:
                    return None
            elif not _same_const(want, got):
                return None
        for v, r in zip(vals, self.ranks):
            if r is not None and isinstance(v, torch.Tensor) and v.dim() != r:
                return None  # traced for another rank
        return vals

    def rebuild(self, values) -> dict:
        return pytree.tree_unflatten(
            [values[v.j] if isinstance(v, _Ph) else v for v in self.leaves], self.spec
        )


_UNSET = object()


def _same_const(a, b) -> bool:
    if isinstance(a, _Ph) or isinstance(b, _Ph):
        return False
    if isinstance(a, (torch.Tensor, fx.Proxy)) or isinstance(b, (torch.Tensor, fx.Proxy)):
        return False
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - an incomparable value is another call
        return False


def _bind(fn, module, args, kwargs) -> dict:
    sig = inspect.signature(fn)
    bound = sig.bind(module, *args, **kwargs)
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop(next(iter(sig.parameters)))  # self
    return out


def site_of_call(fn, module, args, kwargs, kinds_of, ranks: list | None = None) -> Site:
    arguments = _bind(fn, module, args, kwargs)
    leaves, spec = pytree.tree_flatten(arguments)
    ids: dict[int, int] = {}
    out, kinds = [], []
    for leaf in leaves:
        if isinstance(leaf, fx.Proxy):
            j = ids.setdefault(id(leaf), len(ids))
            if j == len(kinds):
                kinds.append(kinds_of(leaf.node))
            out.append(_Ph(j))
        else:
            out.append(leaf)
    ranks = list(ranks) if ranks is not None and len(ranks) == len(ids) else [None] * len(ids)
    return Site(spec, out, len(ids), kinds, ranks)


def root_site(model: nn.Module, ranks: dict | None = None) -> Site:
    """The model's own call: arguments without a default are inputs (floating tensors), the others
    take their default."""
    sig = inspect.signature(type(model).forward)
    arguments, j = {}, 0
    for name, p in list(sig.parameters.items())[1:]:
        if p.kind == p.VAR_POSITIONAL:
            arguments[name] = ()
        elif p.kind == p.VAR_KEYWORD:
            arguments[name] = {}
        elif p.default is inspect.Parameter.empty:
            arguments[name] = _Ph(j)
            j += 1
        else:
            arguments[name] = p.default
    leaves, spec = pytree.tree_flatten(arguments)
    r = (ranks or {}).get("")
    return Site(spec, leaves, j, [Kind(True, True)] * j, list(r) if r and len(r) == j else [None] * j)


def _trace_site(module: nn.Module, site: Site, tracer: Tracer, fn=None) -> fx.Graph:
    """Trace ``module``'s forward (``fn``, default its class's) specialized to ``site``: one graph
    input per placeholder, constants baked in."""
    cls = type(module)
    fn = fn or cls.forward
    sig = inspect.signature(fn)
    params = ", ".join(f"p{j}" for j in range(site.n_inputs))

    def call(self, values):
        arguments = site.rebuild(values)
        bound = inspect.BoundArguments(sig, {next(iter(sig.parameters)): self, **arguments})
        return fn(*bound.args, **bound.kwargs)

    ns = {"_call": call}
    exec(  # noqa: S102 - a fixed template
        compile(
            f"def forward(self, {params}):\n    return _call(self, ({params}{',' if site.n_inputs == 1 else ''}))\n",
            "<qpexp site>",
            "exec",
        ),
        ns,
    )
    module.__class__ = type(cls.__name__, (cls,), {"forward": ns["forward"], "__module__": cls.__module__})
    try:
        return tracer.trace(module)
    finally:
        module.__class__ = cls


def trace(
    model: nn.Module,
    mode: str = "inline",
    leaves: set[str] | None = None,
    training: bool | None = None,
    ranks: dict | None = None,
):
    """Trace ``model`` at its default call (:func:`root_site`) into one ``fx.Graph``; a submodule
    whose forward cannot be traced becomes a leaf and tracing is retried. Returns ``(graph, leaves)``."""
    return _trace_with_retries(
        model, root_site(model, ranks), mode, set(leaves or ()), "", training, ranks=ranks
    )


def _trace_with_retries(module, site, mode, leaves, prefix, training, fn=None, ranks=None):
    was = module.training
    if training is not None:
        module.train(training)
    try:
        for _ in range(MAX_LEAF_RETRIES + 1):
            tracer = Tracer(mode, leaves, prefix, ranks, site.ranks)
            try:
                graph = _trace_site(module, site, tracer, fn)
                graph._qpexp_sites = tracer.sites  # type: ignore[attr-defined]
                return graph, leaves
            except NotImplementedError:
                raise
            except Exception as e:  # noqa: BLE001 - any tracing failure: try the failing submodule as a leaf
                stack = [tracer.full(path) for path, _ in tracer.module_stack.values() if path]
                new = [p for p in stack if p not in leaves and p != prefix]
                if not new:
                    where = prefix or type(module).__name__
                    raise TraceFailure(
                        f"torch.fx cannot trace {where}.forward: {type(e).__name__}: {e}"
                    ) from e
                leaves.add(new[-1])
        raise TraceFailure(
            f"torch.fx cannot trace {prefix or type(module).__name__}: too many untraceable submodules"
        )
    finally:
        module.train(was)


class TraceFailure(RuntimeError):
    pass


# -- value kinds ----------------------------------------------------------------------------------
@dataclass
class Kind:
    tensor: bool
    floating: bool = False


NON_FLOAT_OPS = {
    "eq", "ne", "lt", "le", "gt", "ge", "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__",
    "logical_and", "logical_or", "logical_not", "logical_xor", "isfinite", "isnan", "isinf",
    "argmax", "argmin", "argsort", "long", "int", "bool", "nonzero", "__and__", "__or__", "__invert__",
}  # fmt: skip
CREATION = {
    "arange",
    "ones",
    "zeros",
    "full",
    "empty",
    "tensor",
    "as_tensor",
    "randn",
    "rand",
    "eye",
    "linspace",
}


def _kind_of(v) -> Kind:
    if isinstance(v, torch.Tensor):
        return Kind(True, v.is_floating_point())
    return Kind(False)


def _attr(model: nn.Module, target: str):
    obj = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def static_kind(node: fx.Node, module: nn.Module, kinds: dict[str, Kind]) -> Kind:
    """Whether a node's value is a (floating) tensor: placeholders from their call site, module
    outputs are floating tensors, shape queries are not tensors, comparisons and index ops give
    non-floating tensors, creation ops without tensor inputs are taken as non-floating (not
    quantized), other ops are tensors when an input is (floating when one is)."""
    if node.name in kinds:
        return kinds[node.name]
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    if node.op == "placeholder":
        k = Kind(True, True)
    elif node.op == "get_attr":
        k = _kind_of(_attr(module, node.target))
    elif node.op == "call_module":
        k = Kind(True, True)
    elif node.op == "call_method" and name in SHAPE_METHODS:
        k = Kind(False)
    elif node.op == "call_function" and node.target is getattr:
        k = static_kind(node.args[0], module, kinds) if node.args[1] in ("T", "mT", "data") else Kind(False)
    elif node.op == "output":
        k = Kind(False)
    elif name in NON_FLOAT_OPS:
        k = Kind(True, False)
    elif name == "to" or name == "type":
        dtypes = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, torch.dtype)]
        src = static_kind(node.args[0], module, kinds)
        k = Kind(src.tensor, dtypes[0].is_floating_point if dtypes else src.floating)
    else:
        ins = [static_kind(a, module, kinds) for a in node.all_input_nodes]
        if any(i.floating for i in ins):
            k = Kind(True, True)
        elif any(i.tensor for i in ins) or name in CREATION:
            k = Kind(True, False)
        else:
            k = Kind(False)
    kinds[node.name] = k
    return k


@torch.no_grad()
def _eager(model: nn.Module, example):
    """The model's output on ``example`` in eval mode (RNG state restored)."""
    args = example if isinstance(example, tuple) else (example,)
    was = model.training
    model.eval()
    try:
        with torch.random.fork_rng():
            return model(*args)
    finally:
        model.train(was)


def check_against_eager(model: nn.Module, graph: fx.Graph, example, ref) -> None:
    """Run ``graph`` (eval mode, no grad, RNG state restored) on ``example``; raise
    :class:`TraceFailure` if its outputs differ from the eager ``ref`` (a trace that baked in the
    wrong branch)."""
    gm = fx.GraphModule(model, graph)
    args = example if isinstance(example, tuple) else (example,)
    was = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng():
            got = gm(*args)
    finally:
        model.train(was)
    got_l, _ = pytree.tree_flatten(got)
    ref_l, _ = pytree.tree_flatten(ref)
    for a, b in zip(got_l, ref_l):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-4, equal_nan=True):
                raise TraceFailure("the traced graph does not reproduce the model's forward on the example")


# -- BatchNorm folding ----------------------------------------------------------------------------
def fold_batchnorm_graph_(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    """Fold each conv -> BatchNorm pair of the flat ``graph`` (conv output used only by the BN,
    both called once, BN with running statistics; also linear -> BatchNorm1d); the BN becomes
    ``nn.Identity``. Returns the (conv, bn) names."""
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    pairs = []
    for n in graph.nodes:
        if n.op != "call_module" or not isinstance(modules.get(n.target), nn.modules.batchnorm._BatchNorm):
            continue
        bn = modules[n.target]
        src = n.args[0] if n.args else None
        if not isinstance(src, fx.Node) or src.op != "call_module":
            continue
        conv = modules.get(src.target)
        if type(conv) in CONV:
            channels = conv.out_channels
        elif type(conv) is nn.Linear and isinstance(bn, nn.BatchNorm1d):
            channels = conv.out_features  # (N, C) input: the BN's channels are the linear's outputs
        else:
            continue
        if (
            len(src.users) != 1
            or calls[src.target] != 1
            or calls[n.target] != 1
            or len(n.args) != 1
            or n.kwargs
            or bn.running_mean is None
            or channels != bn.num_features
        ):
            continue
        fold_pair(conv, bn)
        model.set_submodule(n.target, nn.Identity())
        pairs.append((src.target, n.target))
    return pairs


def folded_copy(model: nn.Module, example=None) -> nn.Module:
    """An eval-mode copy of ``model`` with its BatchNorms folded as ``quantize_`` folds them
    (``fold_bn=true``): the deployable float model, whose size the accounting compares the
    compressed one to. A model fx cannot trace folds by the per-Sequential rule, as ``quantize_``
    falls back to. ``model`` itself is left as it is."""
    import copy

    from qpexp.core.quant.layers import fold_batchnorm_
    from qpexp.core.quant.traceable import make_traceable_

    m = copy.deepcopy(model).eval()
    try:
        make_traceable_(m)
        ranks = record_ranks(m, example)[0] if example is not None else None
        graph, _ = trace(m, "inline", training=False, ranks=ranks)
        fold_batchnorm_graph_(m, graph)
    except TraceFailure:
        fold_batchnorm_(m)
    return m


# -- raw weights ----------------------------------------------------------------------------------
@dataclass
class RawWeight:
    name: str  # <owner>.<param>
    owner: str
    param: str
    ch_axis: int


def _reaches_weight_slot(node: fx.Node, modules) -> tuple[bool, str | None]:
    """Whether ``node`` (a parameter) flows, through view ops, into a weight operand; and which
    axis of it the consumer treats as output channels ("first"/"last"; None if ambiguous)."""
    found, axes = False, set()
    todo, seen = [(node, False)], set()
    while todo:
        cur, flipped = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        for user in cur.users:
            name = op_name(user, modules)
            is_t = user.op == "call_function" and user.target is getattr and user.args[1] in ("T", "mT")
            if name in VIEW or is_t:
                todo.append((user, flipped ^ (name in TRANSPOSING or is_t)))
            elif (
                name in FLINEAR and user.op == "call_function" and len(user.args) > 1 and user.args[1] is cur
            ):
                found = True
                axes.add("last" if flipped else "first")
            elif name in MATMUL and name not in ("einsum", "baddbmm") and cur in user.args[:2]:
                found = True
                right = (user.args[1] is cur) != (name == "__rmatmul__")
                axes.add(("last" if right else "first") if not flipped else ("first" if right else "last"))
    return found, (axes.pop() if len(axes) == 1 else None)


def find_raw_weights(model: nn.Module, graph: fx.Graph) -> list[RawWeight]:
    """Floating parameters (2-D or more) of the flat graph used as a weight operand."""
    modules = dict(model.named_modules())
    out, seen = [], set()
    for n in graph.nodes:
        if n.op != "get_attr":
            continue
        p = _attr(model, n.target)
        if not isinstance(p, nn.Parameter) or not p.is_floating_point() or p.dim() < 2 or id(p) in seen:
            continue
        found, axis = _reaches_weight_slot(n, modules)
        if not found:
            continue
        seen.add(id(p))
        owner, _, pname = n.target.rpartition(".")
        out.append(RawWeight(n.target, owner, pname, 0 if axis in (None, "first") else p.dim() - 1))
    return out


# -- the prepare pass -----------------------------------------------------------------------------
@dataclass
class Plan:
    """What :func:`analyse` found, before conv/linear layers are wrapped."""

    leaves: set[str]
    raw: list[RawWeight]
    folded: list[tuple[str, str]]
    traceable: list[str]
    ranks: dict = field(default_factory=dict)  # module path -> ranks of its tensor arguments (example)

    def weight_names(self, model: nn.Module, layer_names: list[str]) -> list[str]:
        """Layer names and raw-weight names in module order (raw weights at their owner's place)."""
        raw_by_owner: dict[str, list[str]] = {}
        for r in self.raw:
            raw_by_owner.setdefault(r.owner, []).append(r.name)
        layers = set(layer_names)
        names = []
        for name, _ in model.named_modules():
            if name in layers:
                names.append(name)
            names.extend(raw_by_owner.pop(name, []))
        return names


def analyse(model: nn.Module, cfg: QuantConfig, example=None) -> Plan:
    """Steps 1-3 of the module doc: traceable swaps, BN folding, raw weights, on one flat trace
    (checked against the eager forward when ``example`` is given). Raises :class:`TraceFailure`."""
    swapped = make_traceable_(model)
    ranks, ref = record_ranks(model, example) if example is not None else ({}, None)
    graph, leaves = trace(model, "inline", training=False, ranks=ranks)
    if example is not None:
        check_against_eager(model, graph, example, ref)
        before = pytree.tree_flatten(ref)[0]
    folded = fold_batchnorm_graph_(model, graph) if cfg.fold_bn else []
    if example is not None and folded:  # folding is exact up to float rounding: check it
        after = pytree.tree_flatten(_eager(model, example))[0]
        for a, b in zip(after, before):
            if isinstance(a, torch.Tensor) and not torch.allclose(a, b, atol=1e-4, rtol=1e-3):
                raise RuntimeError(
                    f"quantize_: folding BatchNorm changed the outputs by {float((a - b).abs().max()):.3g}"
                )
    raw = find_raw_weights(model, graph)
    return Plan(leaves, raw, folded, swapped, ranks)


def _weight_quantizer(spec: QuantSpec, channels: int, ch_axis: int, numel: int = 0) -> nn.Module:
    cls = resolve(spec.scheme, SCHEMES, "quant.scheme")
    if spec.granularity == "group":
        return cls(
            spec, is_weight=True, channels=channels, ch_axis=ch_axis, row_size=numel // max(channels, 1)
        )
    return cls(spec, is_weight=True, channels=channels, ch_axis=ch_axis)


def _act_quantizer(spec: QuantSpec) -> nn.Module:
    cls = resolve(spec.scheme, SCHEMES, "quant.act.scheme")
    return cls(spec, is_weight=False, channels=1, ch_axis=0)


@dataclass
class ModuleGraph:
    """One module's graph at one call site, in train and eval mode."""

    path: str
    module: nn.Module
    site: Site
    graphs: dict  # training (bool) -> fx.Graph
    quantized: bool = False


def build(model: nn.Module, leaves: set[str], ranks: dict | None = None) -> list[ModuleGraph]:
    """One graph per (module, call site), from the model's own call down: user modules and
    traceable equivalents are traced separately, specialized to how their parent calls them."""
    out: list[ModuleGraph] = []
    ranks = ranks or {}
    todo = [("", model, root_site(model, ranks))]
    done: dict[str, list[Site]] = {}
    while todo:
        path, module, site = todo.pop(0)
        if any(site.same(s) for s in done.get(path, [])):
            continue
        done.setdefault(path, []).append(site)
        graphs = {}
        for mode in (True, False):
            graphs[mode], _ = _trace_with_retries(module, site, "prepare", leaves, path, mode, ranks=ranks)
        g = graphs[False]
        kinds = _placeholder_kinds(g, site)
        for qualname, child, args, kwargs in g._qpexp_sites:
            cpath = f"{path}.{qualname}" if path else qualname
            child_site = site_of_call(
                type(child).forward,
                child,
                args,
                kwargs,
                lambda n, m=module, k=kinds: static_kind(n, m, k),
                ranks.get(cpath),
            )
            todo.append((cpath, child, child_site))
        out.append(ModuleGraph(path, module, site, graphs))
    return out


def _placeholder_kinds(graph: fx.Graph, site: Site) -> dict[str, Kind]:
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    return {n.name: k for n, k in zip(phs, site.kinds)}


class _Instrumenter:
    """Inserts quantizer nodes into one module's graph; quantizer modules are registered on the
    model once (by full path) and shared by every graph that names them."""

    def __init__(
        self, model, cfg: QuantConfig, plan: Plan, bits: dict[str, int], registry: dict, mg: ModuleGraph
    ):
        self.model, self.cfg, self.plan, self.bits, self.registry = model, cfg, plan, bits, registry
        self.prefix, self.module, self.site = mg.path, mg.module, mg.site
        self.modules = dict(self.module.named_modules())
        self.raw = {r.name: r for r in plan.raw}

    def full(self, rel: str) -> str:
        return f"{self.prefix}.{rel}" if self.prefix and rel else self.prefix or rel

    def owner(self, node: fx.Node) -> str:
        """The nearest non-container module (relative path) whose forward contains ``node``."""
        stack = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        if node.op == "call_module" and stack and stack[-1] == node.target:
            stack = stack[:-1]
        for path in reversed(stack):
            if not isinstance(self.modules.get(path), CONTAINERS):
                return path
        return ""

    def quantizer(self, owner: str, name: str, factory) -> str:
        """Register (once) the quantizer ``<owner>.<name>``; its path relative to this graph's module."""
        full = self.full(f"{owner}.{name}" if owner else name)
        if full not in self.registry:
            parent_path = self.full(owner)
            parent = self.model.get_submodule(parent_path) if parent_path else self.model
            if hasattr(parent, name):
                raise RuntimeError(f"quantize_: {full!r} already exists")
            q = factory()
            parent.add_module(name, q)
            self.registry[full] = q
        return f"{owner}.{name}" if owner else name

    def run(self, graph: fx.Graph) -> bool:
        """Instrument ``graph`` in place; True if a quantizer node was inserted."""
        self.graph = graph
        self.kinds = _placeholder_kinds(graph, self.site)
        self.counters: dict[tuple[str, str], int] = {}
        self.qver: dict[fx.Node, fx.Node] = {}  # tensor -> its activation-quantized version
        self.weightish: dict[fx.Node, nn.Module] = {}  # node -> the raw weight's quantizer it derives from
        self.inserted: list[fx.Node] = []
        if self.cfg.weight.enabled:  # raw weights: a weight quantizer right after each get_attr
            self._quantize_raw_weights()
        if not self.cfg.act.enabled:
            return bool(self.inserted)
        for node in list(graph.nodes):
            if node.op in ("call_function", "call_method", "call_module") and not node.meta.get(
                "qpexp_quantizer"
            ):
                self._instrument_op(node)
        return bool(self.inserted)

    def _kind(self, n) -> Kind:
        return static_kind(n, self.module, self.kinds)

    def _base(self, owner: str, name: str) -> str:
        """``name``, then ``name_1``, ``name_2``, ... for the same op again in the same owner."""
        k = self.counters.get((owner, name), 0)
        self.counters[(owner, name)] = k + 1
        return name if k == 0 else f"{name}_{k}"

    def _insert(self, src: fx.Node, path: str, meta_from: fx.Node) -> fx.Node:
        """A call of the quantizer ``path`` on ``src``, right after it (its users are not rewired)."""
        with self.graph.inserting_after(src):
            q = self.graph.call_module(path, (src,))
        q.meta["nn_module_stack"] = dict(meta_from.meta.get("nn_module_stack") or {})
        q.meta["qpexp_quantizer"] = True
        self.inserted.append(q)
        return q

    def _quantize_raw_weights(self) -> None:
        """A weight quantizer after each raw weight's ``get_attr``; what the quantized weight flows
        into through view ops is a weight too (``weightish``: no activation quantizer on it)."""
        graph, weightish = self.graph, self.weightish
        for n in list(graph.nodes):
            r = self.raw.get(self.full(n.target)) if n.op == "get_attr" else None
            if r is None:
                continue
            spec = QuantSpec(**{**self.cfg.weight.__dict__, "bits": self.bits[r.name]})
            if not spec.enabled:
                continue
            p = _attr(self.model, r.name)
            owner_rel = n.target.rpartition(".")[0]
            path = self.quantizer(
                owner_rel,
                f"{r.param}_wq",
                lambda p=p, r=r, spec=spec: _weight_quantizer(spec, p.shape[r.ch_axis], r.ch_axis, p.numel()),
            )
            users = list(n.users)
            q = self._insert(n, path, n)
            for u in users:
                u.replace_input_with(n, q)
            weightish[q] = self.registry[self.full(path)]
        for n in graph.nodes:  # what a quantized weight flows into through view ops is a weight
            roots = [weightish[a] for a in n.all_input_nodes if a in weightish]
            if roots and op_name(n, self.modules) in VIEW:
                weightish[n] = roots[0]

    def _act(self, src: fx.Node, consumer: fx.Node, qname: str, owner: str | None = None) -> None:
        """Feed ``consumer`` the activation-quantized ``src`` (one quantizer per tensor, shared by
        all its consumers; none on weights, quantizer outputs and non-floating values)."""
        if not isinstance(src, fx.Node) or src in self.weightish or src.meta.get("qpexp_quantizer"):
            return
        k = self._kind(src)
        if not (k.tensor and k.floating):
            return
        if src not in self.qver:
            owner = self.owner(consumer) if owner is None else owner
            path = self.quantizer(owner, qname, lambda: _act_quantizer(self.cfg.act))
            self.qver[src] = self._insert(src, path, consumer)
        consumer.replace_input_with(src, self.qver[src])

    def _instrument_op(self, node: fx.Node) -> None:
        """Activation quantizers for one op: a pooling module's input, an integer op's floating
        operands, a concatenation's output."""
        name = op_name(node, self.modules)
        if node.op == "call_module":
            if isinstance(self.modules[node.target], POOL_MODULES) and node.args:
                # on the pooling module itself: a container (a Sequential model) gains no child
                self._act(node.args[0], node, "input_q", owner=node.target)
            return
        ins = list(dict.fromkeys(node.all_input_nodes))
        floats = [a for a in ins if self._kind(a).tensor and self._kind(a).floating]
        integer = (
            name in ADD
            or name in MATMUL
            or (name in POOL and node.args and isinstance(node.args[0], fx.Node))
            or (name in MUL and len(floats) >= 2)
            or (name in FLINEAR and node.op == "call_function")
        )
        if integer and floats:
            self._quantize_operands(node, name, floats)
        elif name in CAT and self._kind(node).floating:
            self._quantize_output(node, name)

    def _quantize_operands(self, node: fx.Node, name: str, floats: list[fx.Node]) -> None:
        """An integer op: each floating operand (pooling: the input; ``F.linear``/``F.conv*``: the
        input and a weight that is not a quantized one) through its ``<op>_q<i>`` quantizer."""
        b = self._base(self.owner(node), name.strip("_"))
        operands = floats
        if name in POOL or name in FLINEAR:
            operands = [node.args[0]]
            if name in FLINEAR and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
                operands.append(node.args[1])  # the weight: skipped when it is a quantized weight
        for i, src in enumerate(operands):
            self._act(src, node, f"{b}_q{i}")
        self._link_input(node, self.weightish, self.qver)

    def _quantize_output(self, node: fx.Node, name: str) -> None:
        """A concatenation: one ``<op>_q`` quantizer on its output, for all its users."""
        owner = self.owner(node)
        b = self._base(owner, name)
        users = list(node.users)
        q = self._insert(node, self.quantizer(owner, f"{b}_q", lambda: _act_quantizer(self.cfg.act)), node)
        for u in users:
            u.replace_input_with(node, q)
        self.qver[node] = q

    def _link_input(self, node: fx.Node, weightish: dict, qver: dict) -> None:
        """Tell a raw weight's quantizer which quantizer its input goes through (for the accounting's
        activation width of that weight's product); a plain attribute, not a submodule."""
        weights = [weightish[a] for a in node.all_input_nodes if a in weightish]
        inputs = [a for a in node.all_input_nodes if a not in weightish and a.meta.get("qpexp_quantizer")]
        if len(weights) == 1 and len(inputs) == 1:
            mod = dict(self.module.named_modules()).get(inputs[0].target)
            if mod is not None:
                object.__setattr__(weights[0], "_qpexp_input_q", mod)


@dataclass(frozen=True)
class LinearInput:
    """Recorded by the pass on a raw weight's quantizer (``_qpexp_linear_input``) when, in every
    graph of the model (train and eval mode, every call site), the quantized weight is consumed by
    exactly one ``F.linear`` call, as that call's whole weight (no view in between), so that the
    weight's product is ``x @ W_q^T`` with ``x`` the rows that call multiplies (one-shot rounding,
    :mod:`qpexp.core.quant.gptq`, calibrates on them):

    * ``quantizer``: the activation quantizer whose output is that call's input; it is called on
      nothing else (every call of it in every graph feeds such a call);
    * ``quantizer`` None: the call's input is a placeholder of its module's graph (the module's own
      input), directly or through ``transpose(0, 1)`` of an input of known rank 3 or more (which
      keeps its rows); only attention's ``in_proj_weight`` uses this (its input is ``query``).

    Absent: some use is another op, a view of the weight, or an input that is neither."""

    quantizer: nn.Module | None


def _linear_use(n: fx.Node, modules: dict, gi: int, ranks: dict) -> tuple | None:
    """How the quantized weight ``n`` is used in graph ``gi``: ``("q", quantizer, (gi, input node))``,
    ``("input", None, None)`` (see :class:`LinearInput`) or None (anything else)."""
    users = list(n.users)
    if len(users) != 1:
        return None
    u = users[0]
    if not (
        u.op == "call_function"
        and op_name(u, modules) == "linear"
        and len(u.args) >= 2
        and u.args[1] is n
        and u.args[0] is not n
        and n not in u.args[2:]
        and n not in u.kwargs.values()
        and "weight" not in u.kwargs
        and "input" not in u.kwargs
    ):
        return None
    x = u.args[0]
    if not isinstance(x, fx.Node):
        return None
    if x.op == "call_module" and x.meta.get("qpexp_quantizer"):
        q = modules[x.target]
        return None if getattr(q, "is_weight", False) else ("q", q, (gi, x.name))
    transposed = False
    while x.op == "call_method" and x.target == "transpose" and len(x.args) == 3 and not x.kwargs:
        if set(x.args[1:]) != {0, 1} or not isinstance(x.args[0], fx.Node):
            return None
        transposed, x = True, x.args[0]
    if x.op != "placeholder":
        return None
    if transposed and (ranks.get(x.name) is None or ranks[x.name] < 3):
        return None
    return ("input", None, None)


def link_linear_inputs(mgs: list[ModuleGraph]) -> None:
    """Record :class:`LinearInput` on every raw weight quantizer whose uses allow it (and remove a
    stale record from the others), from the instrumented graphs of ``mgs``."""
    uses: dict[int, list] = {}
    weights: dict[int, nn.Module] = {}
    calls: dict[int, set] = {}  # id(quantizer) -> {(graph, node)}: every call of it
    gi = 0
    for mg in mgs:
        modules = dict(mg.module.named_modules())
        for g in mg.graphs.values():
            gi += 1
            phs = [n for n in g.nodes if n.op == "placeholder"]
            ranks = {p.name: r for p, r in zip(phs, mg.site.ranks or [])}
            for n in g.nodes:
                if n.op != "call_module" or not n.meta.get("qpexp_quantizer"):
                    continue
                q = modules[n.target]
                calls.setdefault(id(q), set()).add((gi, n.name))
                if getattr(q, "is_weight", False):
                    weights[id(q)] = q
                    uses.setdefault(id(q), []).append(_linear_use(n, modules, gi, ranks))
    for key, wq in weights.items():
        if "_qpexp_linear_input" in wq.__dict__:
            del wq.__dict__["_qpexp_linear_input"]
        found = uses[key]
        if not found or any(f is None for f in found):
            continue
        kinds = {f[0] for f in found}
        inputs = {id(f[1]) for f in found}
        if kinds == {"input"}:
            object.__setattr__(wq, "_qpexp_linear_input", LinearInput(None))
        elif kinds == {"q"} and len(inputs) == 1:
            iq = found[0][1]
            if calls.get(id(iq), set()) == {f[2] for f in found}:
                object.__setattr__(wq, "_qpexp_linear_input", LinearInput(iq))


def _compile(graph: fx.Graph, label: str):
    code = graph.python_code(root_module="self")
    ns = dict(code.globals)
    key = f"<qpexp graph {label}>"
    linecache.cache[key] = (len(code.src), None, code.src.splitlines(True), key)
    exec(compile(code.src, key, "exec"), ns)  # noqa: S102 - code generated by torch.fx from our graph
    return ns["forward"], code.src


class _Specialization:
    def __init__(self, site: Site, f_train, f_eval, src_train: str, src_eval: str):
        self.site, self.f_train, self.f_eval = site, f_train, f_eval
        self.src = {"train": src_train, "eval": src_eval}


def _dispatch(self, arguments: dict):
    """The installed forward: the graph of the first call site that matches, else the original
    forward (in float, with a warning: a call the graph was not traced for)."""
    for spec in type(self)._qpexp_specs:
        vals = spec.site.match(arguments)
        if vals is not None:
            return (spec.f_train if self.training else spec.f_eval)(self, *vals)
    base = type(self)._qpexp_base
    if not getattr(self, "_qpexp_warned", False):
        object.__setattr__(self, "_qpexp_warned", True)
        warnings.warn(
            f"{base.__name__}: called with arguments it was not quantized for; running its float forward",
            QpexpWarning,
            stacklevel=3,
        )
    sig = inspect.signature(base.forward)
    bound = inspect.BoundArguments(sig, {next(iter(sig.parameters)): self, **arguments})
    return base.forward(*bound.args, **bound.kwargs)


def _signature_forward(base: type):
    """A forward with ``base.forward``'s exact signature that hands its bound arguments to
    :func:`_dispatch` (fx can trace it: no ``*args`` packing of proxies)."""
    sig = inspect.signature(base.forward)
    ns: dict = {"_dispatch": _dispatch}
    params, names = [], []
    star = False
    for i, (name, p) in enumerate(sig.parameters.items()):
        if i == 0:
            params.append(name)
            continue
        if p.kind == p.VAR_POSITIONAL:
            params.append(f"*{name}")
            star = True
        elif p.kind == p.VAR_KEYWORD:
            params.append(f"**{name}")
        else:
            if p.kind == p.KEYWORD_ONLY and not star:
                params.append("*")
                star = True
            if p.default is inspect.Parameter.empty:
                params.append(name)
            else:
                ns[f"_d{i}"] = p.default
                params.append(f"{name}=_d{i}")
        names.append(name)
    body = ", ".join(f"{n!r}: {n}" for n in names)
    src = f"def forward({', '.join(params)}):\n    return _dispatch({list(sig.parameters)[0]}, {{{body}}})\n"
    exec(compile(src, f"<qpexp forward {base.__name__}>", "exec"), ns)  # noqa: S102 - fixed template
    return ns["forward"]


def install(module: nn.Module, specs: list[_Specialization]) -> None:
    """Make ``specs`` ``module``'s forward: a per-instance subclass of its class (isinstance,
    attributes and state_dict keys unchanged)."""
    cls = type(module)
    base = cls._qpexp_base if getattr(cls, "_qpexp_specs", None) is not None else cls
    ns = {
        "forward": _signature_forward(base),
        "_qpexp_specs": specs,
        "_qpexp_base": base,
        "__module__": base.__module__,
        "__qualname__": base.__qualname__,
    }
    module.__class__ = type(base.__name__, (base,), ns)


def graph_source(module: nn.Module) -> list[dict]:
    """The generated source of each installed graph of ``module`` (``train``/``eval``)."""
    return [s.src for s in getattr(type(module), "_qpexp_specs", None) or []]


def instrument_(model: nn.Module, cfg: QuantConfig, plan: Plan, bits: dict[str, int]) -> dict:
    """Steps 4-5 of the module doc; returns what was done (``model._qpexp_quant_info``)."""
    registry: dict[str, nn.Module] = {}
    mgs = build(model, plan.leaves, plan.ranks)
    for mg in mgs:
        for mode in (True, False):
            mg.quantized |= _Instrumenter(model, cfg, plan, bits, registry, mg).run(mg.graphs[mode])
            mg.graphs[mode].lint()
    link_linear_inputs(mgs)
    by_module: dict[int, list[_Specialization]] = {}
    modules: dict[int, nn.Module] = {}
    for mg in mgs:
        if not mg.quantized:
            continue
        f_train, s_train = _compile(mg.graphs[True], f"{mg.path or 'model'} train")
        f_eval, s_eval = _compile(mg.graphs[False], f"{mg.path or 'model'} eval")
        if s_train == s_eval:
            f_train = f_eval
        by_module.setdefault(id(mg.module), []).append(
            _Specialization(mg.site, f_train, f_eval, s_train, s_eval)
        )
        modules[id(mg.module)] = mg.module
    for key, specs in by_module.items():
        install(modules[key], specs)
    return {
        "graph": "fx",
        "graph_quantizers": sorted(registry),
        "folded_bn": [bn for _, bn in plan.folded],
        "raw_weights": [r.name for r in plan.raw],
        "traceable": plan.traceable,
        "untraced": sorted(plan.leaves),
        "ranks": plan.ranks,
        "float_ops": _float_ops(mgs, plan),
    }


def _float_ops(mgs: list[ModuleGraph], plan: Plan) -> list[str]:
    QuantLayer = _quant_layer_cls()
    found = set()
    for mg in mgs:
        modules = dict(mg.module.named_modules())
        kinds = _placeholder_kinds(mg.graphs[False], mg.site)
        for node in mg.graphs[False].nodes:
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            name = op_name(node, modules)
            if node.op == "call_module":
                m = modules[node.target]
                full = f"{mg.path}.{node.target}" if mg.path else node.target
                if full in plan.leaves:
                    found.add(f"{name} (untraced: {full})")
                elif _is_torch_layer(m) and not isinstance(
                    m, (*POOL_MODULES, *PASS_MODULES, *CONV, nn.Linear)
                ):
                    found.add(name)
                elif not (is_quantizer(m) or isinstance(m, QuantLayer) or _is_torch_layer(m)):
                    continue  # a user module: its own graph is listed separately
                continue
            k = static_kind(node, mg.module, kinds)
            if not (k.tensor and k.floating) or name in PASS or name in ADD | MATMUL | POOL | FLINEAR | CAT:
                continue
            if name in MUL:
                continue  # a product of quantized tensors, or a rescale by a constant
            if name in ("truediv", "div", "__truediv__", "div_"):
                tensors = [a for a in node.all_input_nodes if static_kind(a, mg.module, kinds).tensor]
                if len(tensors) < 2:
                    continue  # a rescale by a constant
            found.add(name)
    return sorted(found)


def prepare_info(model: nn.Module) -> dict:
    return getattr(model, "_qpexp_quant_info", None) or {}


def float_ops(model: nn.Module) -> list[str]:
    """What stays in float in a prepared model (recorded as ``quant/float_ops``)."""
    return list(prepare_info(model).get("float_ops", []))


def graph_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Quantizers that are not part of a :class:`QuantLayer` (graph-level activations, raw weights)."""
    QuantLayer = _quant_layer_cls()
    inside = set()
    for m in model.modules():
        if isinstance(m, QuantLayer):
            inside.update(id(q) for q in (m.wq, m.aq) if q is not None)
    return [(n, m) for n, m in model.named_modules() if is_quantizer(m) and id(m) not in inside]


def warn_untraced(err: Exception) -> None:
    warnings.warn(
        f"quantize_: {err}; falling back to per-layer quantization (BatchNorm folded only inside "
        "nn.Sequential, adds/concatenations/matmuls left in float)",
        QpexpWarning,
        stacklevel=3,
    )
