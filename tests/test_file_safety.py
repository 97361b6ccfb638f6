"""Files cannot run code (issue 20, section 1): hand-made hostile graph files, per-op packages,
pickles given to every loader, and an HTML-breaking string in the dashboard's embedded data.

Every hostile file here is written by hand (zlib JSON header + byte blob in an ``.npz``/``.pt``, or
a pickle), never by the exporter, and each attack's payload would create a sentinel file if it
ran: a test checks the error names the refused node and that the sentinel does not exist.
"""

from __future__ import annotations

import json
import os
import pickle
import zlib
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from torch import nn

from qpexp.core.quant import export as E

GRAPH = "qpexp.intgraph/1"
T, D = "$t", "$d"


def ref(i):
    return {"$n": i}


def call(fn, *args, op="call", **kwargs):
    return {"op": op, "fn": fn, "args": {T: list(args)}, "kwargs": {D: [[k, v] for k, v in kwargs.items()]}}


def method(fn, *args, **kwargs):
    return call(fn, *args, op="method", **kwargs)


def write_graph(path, nodes, blob=b"", fmt=GRAPH):
    """A graph file by hand: the zlib-compressed JSON header and the blob, as the format documents."""
    head = np.frombuffer(zlib.compress(json.dumps({"format": fmt, "nodes": nodes}).encode()), np.uint8)
    body = np.frombuffer(blob, np.uint8)
    if path.suffix == ".npz":
        with open(path, "wb") as f:
            np.savez(f, header=head, blob=body)
    else:
        # the .pt container is tagged with the per-op format's name whatever the header holds
        torch.save({"format": E.FORMAT, "header": torch.tensor(head), "blob": torch.tensor(body)}, path)
    return path


def hostile(nodes):
    return [{"op": "input", "name": "x"}, *nodes, {"op": "output", "args": ref(0)}]


def exec_chain(sentinel):
    """Tensor -> (rebuild fn, args) -> fn.__globals__ -> __builtins__ -> exec(code writing sentinel)."""
    code = f"open({str(sentinel)!r}, 'w').write('ran')"
    return hostile(
        [
            method("__reduce_ex__", ref(0), 2),
            method("__getitem__", ref(1), 0),
            method("__getattribute__", ref(2), "__globals__"),
            method("__getitem__", ref(3), "__builtins__"),
            method("__getitem__", ref(4), "exec"),
            method("__call__", ref(5), code),
        ]
    )


def refused_at_load(path, needle, sentinel=None):
    with pytest.raises(ValueError) as e:
        E.load(path)  # never returns a model: nothing can run
    msg = str(e.value)
    assert needle in msg and "node " in msg, msg
    if sentinel is not None:
        assert not sentinel.exists()
    return msg


# -- the attack of the issue, before the fix (shown by hand) and refused now ----------------------
@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_dunder_chain_to_builtins_is_refused_at_load(tmp_path, suffix):
    sentinel = tmp_path / "ran"
    path = write_graph(tmp_path / f"m{suffix}", exec_chain(sentinel))
    msg = refused_at_load(path, "'__reduce_ex__'", sentinel)
    assert "node 1" in msg


@pytest.mark.parametrize(
    "node, needle",
    [
        (method("__getattribute__", ref(0), "__class__"), "'__getattribute__'"),
        (method("__reduce_ex__", ref(0), 2), "'__reduce_ex__'"),
        (method("__reduce__", ref(0)), "'__reduce__'"),
        (method("__call__", ref(0)), "'__call__'"),
        (method("__setattr__", ref(0), "data", 1), "'__setattr__'"),
        (method("type", ref(0), "antigravity.X"), "'type'"),  # Tensor.type imports a dotted name
        (method("numpy", ref(0)), "'numpy'"),
    ],
)
def test_methods_outside_the_table_are_refused(tmp_path, node, needle):
    sentinel = tmp_path / "ran"
    path = write_graph(tmp_path / "m.npz", hostile([node]))
    assert "node 1" in refused_at_load(path, needle, sentinel)


def test_call_on_a_non_tensor_is_refused(tmp_path):
    # `x.device` is an allowed read; calling the device, or any method on it or on a literal, is not
    for nodes, needle in [
        ([call("builtins.getattr", ref(0), "device"), method("__call__", ref(1))], "'__call__'"),
        ([call("builtins.getattr", ref(0), "shape"), method("__getitem__", ref(1), 0)], "not on a tensor"),
        ([method("__getitem__", "a string", 0)], "not on a tensor"),
        ([method("__mul__", {"$dt": "float32"}, 2)], "not on a tensor"),
    ]:
        path = write_graph(tmp_path / "m.npz", hostile(nodes))
        assert f"node {len(nodes)}" in refused_at_load(path, needle)


@pytest.mark.parametrize("attr", ["__class__", "grad_fn", "_base", "untyped_storage", "__dict__"])
def test_getattr_outside_getattr_ok_is_refused(tmp_path, attr):
    path = write_graph(tmp_path / "m.npz", hostile([call("builtins.getattr", ref(0), attr)]))
    assert "node 1" in refused_at_load(path, f"getattr {attr!r}")


@pytest.mark.parametrize(
    "fn, args",
    [
        ("torch.import_ir_module", ["x", "y"]),
        ("torch.set_default_dtype", [{"$dt": "float64"}]),
        ("torch.set_grad_enabled", [False]),
        ("torch.manual_seed", [0]),
        ("torch.load", ["/etc/passwd"]),
        ("torch.from_file", ["/etc/passwd"]),
        ("os.system", ["touch x"]),
        ("builtins.exec", ["print(1)"]),
        ("builtins.__import__", ["os"]),
        ("operator.attrgetter", ["__class__"]),
        ("operator.methodcaller", ["__reduce_ex__", 2]),
        ("importlib.import_module", ["os"]),
        ("torch.ops.aten.add", [1, 2]),
    ],
)
def test_functions_outside_the_table_are_refused(tmp_path, fn, args):
    dtype, grad = torch.get_default_dtype(), torch.is_grad_enabled()
    path = write_graph(tmp_path / "m.npz", hostile([call(fn, *args)]))
    assert "node 1" in refused_at_load(path, repr(fn))
    assert torch.get_default_dtype() == dtype and torch.is_grad_enabled() == grad  # no switch flipped


@pytest.mark.parametrize(
    "arg, needle",
    [
        ({"$dt": "_dynamo"}, "not a stored value"),  # dtypes only from the closed set
        ({"$mf": "load"}, "not a stored value"),
        ({"$dev": "cpu'); import os; ('"}, "not a stored value"),
        ({"$f": "1e3"}, "not a stored value"),
        ({"$q": 1}, "not a stored value"),
        ({"$n": 5}, "not an earlier node"),  # a later node
        ({"$n": True}, "not an earlier node"),
    ],
)
def test_argument_literals_come_from_closed_sets(tmp_path, arg, needle):
    path = write_graph(tmp_path / "m.npz", hostile([call("torch.relu", arg)]))
    assert "node 1" in refused_at_load(path, needle)


def test_keyword_names_cannot_inject_source(tmp_path):
    # torch.fx writes keyword names into the generated forward() unquoted: only identifiers pass
    sentinel = tmp_path / "ran"
    key = f"inplace=open({str(sentinel)!r},'w')) #"
    path = write_graph(
        tmp_path / "m.npz", hostile([call("torch.nn.functional.relu", ref(0), **{key: False})])
    )
    assert "node 1" in refused_at_load(path, "keyword", sentinel)


def test_input_names_and_unknown_nodes_are_refused(tmp_path):
    path = write_graph(tmp_path / "m.npz", [{"op": "input", "name": "x = 1; import os"}])
    refused_at_load(path, "identifier")
    path = write_graph(tmp_path / "m.npz", hostile([{"op": "module", "fn": "os.system"}]))
    refused_at_load(path, "unknown node")


def test_segment_dtypes_are_numeric_only(tmp_path):
    seg = {"offset": 0, "nbytes": 8, "dtype": "O", "shape": [1]}
    path = write_graph(tmp_path / "m.npz", hostile([{"op": "const", "name": "c", "value": seg}]), b"\0" * 8)
    with pytest.raises(ValueError, match="dtype 'O'"):
        E.load(path)


# -- weight layouts: the four names, and N:M ranks below C(m, n) ----------------------------------------
def nm_weight(layout="nm", ranks=(5, 0)):
    """A 2 x 4 linear weight, 2:4, 4-bit symmetric codes (per-tensor scale 0.5), by hand: each row's
    kept set as its 3-bit rank among the 6 sets of 2 of 4 (5: columns 2, 3; 0: columns 0, 1), then
    the 4 stored codes 1, 2, 3, 4 (bit-packed as ``code + 7``), then the scale."""
    ranks_byte = ranks[0] | ranks[1] << 3
    codes = bytes([(1 + 7) | (2 + 7) << 4, (3 + 7) | (4 + 7) << 4])
    blob = bytes([ranks_byte]) + codes + np.float32(0.5).tobytes()
    packed = {"dtype": "packed", "offset_by": 0}
    weight = {
        "bits": 4,
        "shape": [2, 4],
        "per_channel": False,
        "ch_axis": 0,
        "scheme": "linear",
        "symmetric": True,
        "qmin": -7,
        "qmax": 7,
        "layout": layout,
        "pruned": True,
        "payload_bits": 2 * (2 * 4 + 3) + 2,
        "nm": [2, 4],
        "positions": {"offset": 0, "nbytes": 1, **packed, "bits": 3, "count": 2},
        "tail_positions": None,
        "values": {"offset": 1, "nbytes": 2, **packed, "bits": 4, "offset_by": -7, "count": 4},
        "scale": {"offset": 3, "nbytes": 4, "dtype": "float32", "shape": []},
    }
    return weight, blob


def write_ops(path, ops, blob=b""):
    """A per-op file by hand: the zlib-compressed JSON header and the blob in an ``.npz``."""
    head = np.frombuffer(zlib.compress(json.dumps({"format": E.FORMAT, "ops": ops}).encode()), np.uint8)
    with open(path, "wb") as f:
        np.savez(f, header=head, blob=np.frombuffer(blob, np.uint8))
    return path


def nm_file(path, graph: bool, **kw):
    weight, blob = nm_weight(**kw)
    if graph:
        nodes = [{"op": "qweight", "name": "fc.weight", "quantizer": "fc_wq", "weight": weight}]
        return write_graph(
            path, [{"op": "input", "name": "x"}, *nodes, {"op": "output", "args": ref(1)}], blob
        )
    return write_ops(
        path, [{"name": "fc", "op": "Linear", "weight": weight, "bias": None, "act": None}], blob
    )


def test_a_hand_made_nm_weight_loads_and_computes(tmp_path):
    m = E.load(nm_file(tmp_path / "m.npz", graph=False))
    # row 0 holds codes 1, 2 in columns 2, 3; row 1 codes 3, 4 in columns 0, 1; times the scale 0.5
    assert m(torch.tensor([[1.0, 10.0, 100.0, 1000.0]])).tolist() == [[(100 + 2000) * 0.5, (3 + 40) * 0.5]]
    assert m.integer_layers()[0].weight_mask.tolist() == [
        [False, False, True, True],
        [True, True, False, False],
    ]
    assert E.load(nm_file(tmp_path / "g.npz", graph=True))(torch.zeros(1)).tolist() == [
        [0.0, 0.0, 0.5, 1.0],
        [1.5, 2.0, 0.0, 0.0],
    ]


@pytest.mark.parametrize("graph, layer", [(False, "'fc'"), (True, "'fc.weight'")])
@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"layout": "huffman"}, "weight layout 'huffman' is not one of"),
        ({"layout": "__class__"}, "weight layout '__class__'"),
        ({"ranks": (6, 0)}, "C(4, 2) = 6"),  # 3 bits hold 8 values: 6 and 7 name no set
        ({"ranks": (0, 7)}, "C(4, 2) = 6"),
    ],
)
def test_unknown_layouts_and_ranks_beyond_the_sets_are_refused(tmp_path, graph, layer, kw, needle):
    path = nm_file(tmp_path / "m.npz", graph, **kw)
    with pytest.raises(ValueError) as e:
        E.load(path)
    msg = str(e.value)
    assert needle in msg and f"layer {layer}" in msg, msg


def test_a_well_formed_hand_made_file_loads_and_computes(tmp_path):
    """The checks refuse only what is outside the table: relu(x) * 2 + x.shape[0], written by hand."""
    nodes = [
        {"op": "input", "name": "x"},
        call("torch.nn.functional.relu", ref(0)),
        method("__mul__", ref(1), 2),
        call("builtins.getattr", ref(0), "shape"),
        call("operator.getitem", ref(3), 0),
        call("operator.add", ref(2), ref(4)),
        {"op": "output", "args": ref(5)},
    ]
    m = E.load(write_graph(tmp_path / "m.npz", nodes))
    x = torch.tensor([[-1.0, 2.0, 3.0]])
    assert m(x).tolist() == [[0.0 * 2 + 1, 2.0 * 2 + 1, 3.0 * 2 + 1]]


# -- the writer uses the same table -----------------------------------------------------------------
class _CumProd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x).cumprod(1)  # a tensor method outside ALLOWED_METHODS


class _LogAddExp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.logaddexp(self.fc(x), x[:, :3])  # a function outside ALLOWED_FUNCTIONS


@pytest.mark.parametrize("cls, needle", [(_CumProd, "'cumprod'"), (_LogAddExp, "logaddexp")])
def test_writer_refuses_what_the_reader_would(cls, needle):
    from qpexp.core.quant.graph_export import graph_ir

    with pytest.raises(NotImplementedError, match=needle):
        graph_ir(cls())


def test_the_table_holds_only_functions_and_dunders_from_the_arithmetic_set():
    import types

    from qpexp.core.quant import allowlist as A

    for ns, name in A.ALLOWED_FUNCTIONS:
        fn = A.function(f"{ns}.{name}")
        assert callable(fn) and not isinstance(fn, (type, types.ModuleType)), (ns, name)
        assert not name.startswith("set_") and "load" not in name and "save" not in name
    dunders = {m for m in A.ALLOWED_METHODS if m.startswith("_")}
    assert dunders == A.ALLOWED_DUNDERS
    assert not dunders & {"__call__", "__getattribute__", "__getattr__", "__reduce__", "__reduce_ex__"}
    assert all(hasattr(torch.Tensor, m) for m in A.ALLOWED_METHODS)


# -- the other loaders ------------------------------------------------------------------------------
class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_per_op_package_with_a_pickled_array_is_refused(tmp_path):
    sentinel = tmp_path / "ran"
    head = np.frombuffer(zlib.compress(json.dumps({"format": E.FORMAT, "ops": []}).encode()), np.uint8)
    with open(tmp_path / "m.npz", "wb") as f:
        np.savez(f, header=head, blob=np.array([_Evil(sentinel)], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        E.load(tmp_path / "m.npz")
    torch.save({"format": E.FORMAT, "header": torch.tensor(head), "blob": _Evil(sentinel)}, tmp_path / "m.pt")
    with pytest.raises(pickle.UnpicklingError):
        E.load(tmp_path / "m.pt")
    assert not sentinel.exists()


def test_user_npz_with_a_pickled_array_is_refused(tmp_path):
    from qpexp.data import DataError, load_npz

    sentinel = tmp_path / "ran"
    with open(tmp_path / "d.npz", "wb") as f:
        np.savez(f, x=np.array([_Evil(sentinel)], dtype=object), y=np.zeros(1))
    with pytest.raises(DataError, match="without pickle"):
        load_npz(tmp_path / "d.npz")
    assert not sentinel.exists()


@pytest.mark.parametrize(
    "payload",
    [
        lambda s: _Evil(s),
        lambda s: np.array([_Evil(s)], dtype=object),  # inside an object array: still find_class
    ],
)
def test_cifar_unpickler_refuses_any_global_outside_its_list(tmp_path, payload):
    from qpexp.vision import DataError, _NumpyOnly

    sentinel = tmp_path / "ran"
    data = pickle.dumps({b"data": payload(sentinel), b"labels": [0]}, protocol=2)
    with pytest.raises(DataError, match="posix.system|os.system|nt.system"):
        _NumpyOnly(__import__("io").BytesIO(data), encoding="latin1").load()
    assert not sentinel.exists()
    ok = pickle.dumps({b"data": np.arange(6, dtype=np.uint8), b"labels": [1, 2]}, protocol=2)
    back = _NumpyOnly(__import__("io").BytesIO(ok), encoding="latin1").load()
    assert back[b"data"].tolist() == [0, 1, 2, 3, 4, 5] and back[b"labels"] == [1, 2]


class _Scripts(HTMLParser):
    """The text of every <script> element, as an HTML parser splits the page."""

    def __init__(self):
        super().__init__()
        self.scripts, self._open = [], None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._open = [dict(attrs).get("id"), ""]

    def handle_data(self, data):
        if self._open is not None:
            self._open[1] += data

    def handle_endtag(self, tag):
        if tag == "script" and self._open is not None:
            self.scripts.append(tuple(self._open))
            self._open = None


def test_dashboard_data_cannot_leave_its_script_element():
    pytest.importorskip("plotly")
    from qpexp.dashboard import render

    evil = "</script><script>document.title='pwned'</script><!--<script>\u2028&amp;"
    view = {"title": "t", "note": evil}
    page = render(view, ["run_dir", "x"], [[evil, "1"]])
    plain = render({"title": "t", "note": "a"}, ["run_dir", "x"], [["a", "1"]])
    parsed, reference = _Scripts(), _Scripts()
    parsed.feed(page)
    reference.feed(plain)
    assert [i for i, _ in parsed.scripts] == [i for i, _ in reference.scripts]  # no element added
    data = {i: s for i, s in parsed.scripts if i}
    assert json.loads(data["frontier-view"]) == view
    assert json.loads(data["frontier-csv"]) == {"columns": ["run_dir", "x"], "rows": [[evil, "1"]]}
    assert "<" not in data["frontier-view"] and "<" not in data["frontier-csv"]  # no tag, no <!--


def test_dashboard_placeholders_inside_the_data_stay_as_written():
    """The template is filled in one pass: a CSV cell or a title that spells a placeholder
    (``%%VIEW%%``, ``%%PLOTLYJS%%``) is data, not an instruction to paste more into the page."""
    pytest.importorskip("plotly")
    from qpexp.dashboard import render

    cell = "%%VIEW%% %%PLOTLYJS%% %%STYLE%%"
    page = render({"title": "%%CSV%%", "note": "a"}, ["run_dir", "x"], [[cell, "1"]])
    parsed = _Scripts()
    parsed.feed(page)
    data = {i: s for i, s in parsed.scripts if i}
    assert json.loads(data["frontier-csv"]) == {"columns": ["run_dir", "x"], "rows": [[cell, "1"]]}
    assert json.loads(data["frontier-view"])["title"] == "%%CSV%%"
    assert "<title>%%CSV%%</title>" in page
    assert page.count("Plotly") == render({"title": "t"}, ["x"], [["1"]]).count("Plotly")  # one plotly.js


def _yaml_bomb(sentinel) -> str:
    return f"a: !!python/object/apply:os.system ['touch {sentinel}']\n"


def test_point_config_yaml_with_a_python_tag_is_refused(tmp_path):
    import yaml

    from qpexp.frontier import _load_point

    sentinel, point = tmp_path / "ran", tmp_path / "sweep" / "p0"
    (point / ".hydra").mkdir(parents=True)
    (point / ".hydra" / "config.yaml").write_text(_yaml_bomb(sentinel))
    with pytest.raises(yaml.constructor.ConstructorError, match="python/object/apply"):
        _load_point(point, tmp_path / "sweep")
    assert not sentinel.exists()


def test_reproduction_table_with_a_python_tag_is_refused(tmp_path):
    import yaml

    from qpexp.report import build

    sentinel = tmp_path / "ran"
    (tmp_path / "table.yaml").write_text(_yaml_bomb(sentinel))
    with pytest.raises(yaml.constructor.ConstructorError, match="python/object/apply"):
        build([], tmp_path / "out.md", table=tmp_path / "table.yaml")
    assert not sentinel.exists()
