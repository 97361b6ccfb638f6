"""quant.scheme=codebook: k-means weight sharing (Han et al. 2016) against hand-computed examples,
scikit-learn's Lloyd k-means, and a hand-summed centroid gradient."""

import numpy as np
import pytest
import torch
from torch import nn

from qpexp.core.accounting import size_bits
from qpexp.core.quant import QuantConfig, QuantSpec, quantize_
from qpexp.core.quant.codebook import CodebookQuantizer, kmeans_1d, no_integer_form


def _spec(bits=2):
    return QuantSpec(bits=bits, scheme="codebook", granularity="tensor", symmetric=False, range="minmax")


def test_linear_init_and_lloyd_by_hand():
    # 2 bits: 3 centroids from linspace(-1, 1) = [-1, 0, 1]; the zero is pruned, not clustered.
    # -1, -0.9 -> -1; 0.1, 0.2 -> 0; 1.0 -> 1; means: -0.95, 0.15, 1.0; midpoints -0.4, 0.575: stable
    w = torch.tensor([-1.0, -0.9, 0.0, 0.1, 0.2, 1.0])
    q = CodebookQuantizer(_spec(2), is_weight=True)
    out = q(w)
    assert torch.allclose(q.centroids.detach(), torch.tensor([-0.95, 0.15, 1.0]))
    assert q.int_repr(w).tolist() == [1, 1, 0, 2, 2, 3]
    assert torch.allclose(out, torch.tensor([-0.95, -0.95, 0.0, 0.15, 0.15, 1.0]))
    assert out[2].item() == 0.0  # exactly zero


def test_empty_cluster_keeps_its_centroid():
    # [1, 2, 3, 10]: init [1, 5.5, 10]; 1, 2, 3 -> 1st, 10 -> 3rd, none -> 2nd: [2, 5.5, 10]
    c, idx = kmeans_1d(torch.tensor([1.0, 2.0, 3.0, 10.0]), 3)
    assert c.tolist() == [2.0, 5.5, 10.0]
    assert idx.tolist() == [0, 0, 0, 2]


def test_kmeans_matches_sklearn_lloyd():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(-0.3, 0.05, 300), rng.normal(0.2, 0.1, 500), rng.laplace(0, 0.02, 200)])
    k = 7
    init = np.linspace(x.min(), x.max(), k).reshape(-1, 1)
    ref = KMeans(k, init=init, n_init=1, max_iter=300, tol=0, algorithm="lloyd").fit(x.reshape(-1, 1))
    c, idx = kmeans_1d(torch.tensor(x), k, iters=300)
    order = np.argsort(ref.cluster_centers_.ravel())
    np.testing.assert_allclose(c.numpy(), ref.cluster_centers_.ravel()[order], rtol=0, atol=1e-9)
    relabel = np.argsort(order)  # sklearn's label -> rank of its centre
    assert (idx.numpy() == relabel[ref.labels_]).all()


def test_centroid_gradient_is_the_sum_of_its_weights_gradients():
    torch.manual_seed(0)
    w = torch.randn(6, 5)
    w[w.abs() < 0.3] = 0.0  # pruned
    w = nn.Parameter(w)
    q = CodebookQuantizer(_spec(3), is_weight=True)
    g = torch.randn(6, 5)
    (q(w) * g).sum().backward()
    codes = q.int_repr(w)
    expected = torch.zeros(7)
    for i in range(6):  # by hand: every weight's upstream gradient added to its centroid
        for j in range(5):
            if codes[i, j] > 0:
                expected[codes[i, j] - 1] += g[i, j]
    torch.testing.assert_close(q.centroids.grad, expected, rtol=0, atol=1e-6)
    assert w.grad is None  # the latent weight is fixed to its cluster
    assert (q(w)[w == 0] == 0).all()


def test_size_counts_codes_and_codebook():
    # 16 unpruned weights at 2 bits: dense 32 (bitmask 48, relative 96) + 2-bit flag; codebook 3 x 32
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 2, bias=False))
    quantize_(model, QuantConfig(weight=_spec(2), act=QuantSpec(bits=32)))
    assert size_bits(model) == 32 + 2 + 3 * 32


def test_state_dict_round_trip():
    torch.manual_seed(0)
    w = torch.randn(4, 3)
    q = CodebookQuantizer(_spec(2), is_weight=True)
    ref = q(w).detach()
    fresh = CodebookQuantizer(_spec(2), is_weight=True)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(torch.zeros(4, 3)), ref)  # the codes and centroids, not the new weight


def test_bad_configs_name_the_key():
    with pytest.raises(ValueError, match="quant.granularity=tensor"):
        QuantSpec(bits=4, scheme="codebook", granularity="channel").validate("quant")
    with pytest.raises(ValueError, match="quant.act.scheme=codebook"):
        QuantConfig(weight=_spec(4), act=QuantSpec(bits=8, scheme="codebook")).validate()


def test_deploy_reports_simulated_only():
    from qpexp.deploy import deploy, deploy_status

    model = nn.Sequential(nn.Linear(8, 2))
    quantize_(model, QuantConfig(weight=_spec(4), act=QuantSpec(bits=8)))
    assert "codebook" in no_integer_form(model)
    out = deploy(model, None, "/nonexistent", None, {})
    assert out["deploy/simulated_only"] is True
    assert "quant.scheme=codebook" in out["deploy/simulated_reason"]
    # no integer form: no deployment check ran, so the point is not_deployed (its accuracy stands)
    assert deploy_status(out, 0.9)[0] == "not_deployed"
