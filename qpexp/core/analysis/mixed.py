"""Mixed precision under a size budget: one weight width per layer, the summed sensitivity minimal,
the honest size (:func:`qpexp.core.accounting.size_bits`) within the budget.

* :func:`layer_sizes` measures, on the real (pruned) model prepared with the run's quantizers, each
  layer's stored bits at each width (weights in the cheapest format after quantization, its
  quantizers' scales, its bias) and the fixed rest (everything else ``size_bits`` counts). A layer's
  row depends only on its own width, so the size of any assignment is the sum of its rows plus the
  rest: exactly ``size_bits`` of the model with that assignment applied.
* :func:`solve` is the exact solver of that multiple-choice knapsack: dynamic programming over
  layers on the Pareto set of (size, cost) partial assignments (every size an integer, no
  discretization; dominated partial assignments dropped), the smallest total cost within the budget.
* :func:`assign_bits` joins them: the cost of a layer at a width is its validation-loss increase
  with that layer alone quantized (:func:`qpexp.core.sensitivity.quant_sensitivity`, activations
  quantized as the run says), as in HAWQ-v3's integer program with a measured, Hessian-free
  sensitivity.
"""

from __future__ import annotations

from qpexp.core.accounting import size_bits
from qpexp.core.analysis.sensitivity import (
    prepare_float_weights,
    quant_sensitivity,
    set_weight_bits,
    weight_layers,
)
from qpexp.core.quant import QuantConfig

WIDTHS = (2, 3, 4, 5, 6, 7, 8)


def layer_sizes(
    model, qcfg: QuantConfig, widths=WIDTHS, example=None, calib=None
) -> tuple[dict[str, dict[int, int]], int]:
    """``({layer: {bits: stored bits of that layer}}, fixed bits of the rest)`` from ``size_bits``
    of a copy of ``model`` prepared with ``qcfg`` (activations included; raw weight matrices such as
    attention ``in_proj_weight``, not conv/linear layers, at ``qcfg.weight.bits``, as ``quantize_``
    leaves them) and every conv/linear layer at each width."""
    prepared = prepare_float_weights(model, qcfg, example, act=True, calib=calib, raw_bits=qcfg.weight.bits)
    wrappers = weight_layers(prepared)
    sizes: dict[str, dict[int, int]] = {n: {} for n in wrappers}
    rest = set()
    for b in widths:
        for w in wrappers.values():
            set_weight_bits(w, qcfg, b)
        total, rows, _ = size_bits(prepared, detail=True)
        for n in wrappers:
            r = rows[n]
            sizes[n][b] = r["weight_bits"] + r["qparam_bits"] + r["bias_bits"]
        rest.add(total - sum(sizes[n][b] for n in wrappers))
    if len(rest) != 1:  # the rest does not depend on the layers' widths
        raise RuntimeError(f"the size outside the layers changed with their widths: {sorted(rest)}")
    return sizes, rest.pop()


def solve(costs: dict[str, dict[int, float]], sizes: dict[str, dict[int, int]], budget: int):
    """Exact: one width per layer minimising the summed ``costs`` with summed ``sizes <= budget``.

    Returns ``(assignment {layer: bits}, size, cost)``, or None when even the smallest widths exceed
    the budget. Ties in cost go to the smaller size (then to the wider widths, listed first).
    """
    states = [(0, 0.0, ())]  # (size, cost, widths so far): the Pareto set, sorted by size
    layers = list(sizes)
    for n in layers:
        options = sorted(sizes[n], reverse=True)
        cand = [
            (s + sizes[n][b], c + costs[n][b], ch + (b,))
            for s, c, ch in states
            for b in options
            if s + sizes[n][b] <= budget
        ]
        cand.sort(key=lambda t: (t[0], t[1]))
        states = []
        for t in cand:  # keep a state only if it costs strictly less than every smaller one
            if not states or t[1] < states[-1][1]:
                states.append(t)
        if not states:
            return None
    s, c, ch = min(states, key=lambda t: (t[1], t[0]))
    return dict(zip(layers, ch)), s, c


def smallest(sizes: dict[str, dict[int, int]]) -> dict[str, int]:
    """Each layer at its smallest-size width (the assignment when no width fits the budget)."""
    return {n: min(sizes[n], key=lambda b: (sizes[n][b], b)) for n in sizes}


def assign_bits(
    model, batches, qcfg: QuantConfig, budget_bits: int, widths=WIDTHS, example=None, calib=None
) -> dict:
    """Per-layer weight widths within ``budget_bits`` (honest size), the summed validation-loss
    increase minimal. Returns ``assignment``, ``planned_bits`` (the size that assignment has before
    training), ``feasible`` (False: no assignment fits; each layer then takes its smallest width),
    ``cost``, ``sizes``, ``fixed_bits`` and ``costs``."""
    sizes, fixed = layer_sizes(model, qcfg, widths, example, calib)
    sens = quant_sensitivity(model, batches, qcfg, widths, example, act=True, calib=calib)
    ref_loss = sens[""][32][1]
    costs = {n: {b: sens[n][b][1] - ref_loss for b in widths} for n in sizes}
    found = solve(costs, sizes, budget_bits - fixed)
    if found is None:
        assignment = smallest(sizes)
        layer_bits = sum(sizes[n][b] for n, b in assignment.items())
        cost = sum(costs[n][b] for n, b in assignment.items())
    else:
        assignment, layer_bits, cost = found
    return {
        "assignment": assignment,
        "planned_bits": layer_bits + fixed,
        "feasible": found is not None,
        "cost": cost,
        "sizes": sizes,
        "fixed_bits": fixed,
        "costs": costs,
    }
