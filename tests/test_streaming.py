"""Memory budget, resident vs recomputed gradient sets, and streamed products vs dense formulas."""

from __future__ import annotations

import psutil
import pytest
import torch

from lightning_fimoda import SupervisedTask, per_sample_gradients
from lightning_fimoda.exceptions import ConfigurationError
from lightning_fimoda.gradients import GradientCache, gradient_chunks, resolve_memory_budget
from lightning_fimoda.gradients import streaming as st

from .conftest import make_mlp, make_regression

P = 37  # parameters of make_mlp(): 4*6 + 6 + 6 + 1
ROW = P * 8  # bytes of one float64 gradient row
TINY = 2 * 3 * 4 * ROW  # chunk half = 3 examples with vmap intermediates; resident half = 12 rows


@pytest.fixture
def setup():
    model, task = make_mlp(), SupervisedTask("mse")
    train, test = make_regression(24, seed=1), make_regression(5, seed=2)
    return model, task, train, test


def test_default_budget_is_a_quarter_of_available_memory():
    got = resolve_memory_budget(None, "cpu")
    assert got == pytest.approx(0.25 * psutil.virtual_memory().available, rel=0.1)
    assert resolve_memory_budget(12345) == 12345
    for bad in (0, -1, 1.5, True, "1GB"):
        with pytest.raises(ConfigurationError, match="memory_budget"):
            resolve_memory_budget(bad)
    with pytest.raises(ConfigurationError):
        GradientCache(memory_budget=-5)


def test_cache_reports_budget_and_storage(setup):
    model, task, train, test = setup
    cache = GradientCache(memory_budget=TINY)
    idx, tidx = torch.arange(24), torch.arange(5)
    train_stream = cache.stream(model, task, train, idx)
    test_stream = cache.stream(model, task, test, tidx, kind="measurement", what="test")
    assert cache.info["memory_budget"] == TINY and cache.info["memory_budget_source"] == "given"
    assert train_stream.storage == "recomputed" and test_stream.storage == "resident"
    assert cache.info["gradient_sets"]["training loss"] == {"storage": "recomputed", "n": 24, "num_params": P,
                                                            "chunk_rows": 3}
    assert cache.info["gradient_sets"]["test measurement"]["storage"] == "resident"
    with pytest.raises(ConfigurationError, match="do not fit the memory budget"):
        cache.get(model, task, train, idx)
    assert cache.get(model, task, test, tidx, kind="measurement").flat is next(iter(test_stream))[1]
    with pytest.raises(ConfigurationError, match="too small for one example"):
        GradientCache(memory_budget=ROW).stream(model, task, train, idx)
    auto = GradientCache()
    auto.stream(model, task, train, idx)
    assert auto.info["memory_budget"] > 0 and "25%" in auto.info["memory_budget_source"]


def test_recomputed_stream_chunks_follow_the_budget(setup):
    model, task, train, _ = setup
    full = per_sample_gradients(model, task, train).flat
    stream = GradientCache(memory_budget=TINY).stream(model, task, train, torch.arange(24))
    for _ in range(2):  # every pass recomputes the same rows
        chunks = list(stream)
        assert max(c.shape[0] for _, c in chunks) == 3
        assert torch.cat([p for p, _ in chunks]).tolist() == list(range(24))
        torch.testing.assert_close(torch.cat([c for _, c in chunks]), full, rtol=0, atol=1e-12)
    assert stream.passes == 2


def test_chunks_positions_and_shifted_parameters(setup):
    model, task, train, _ = setup
    shift = {n: p.detach() + 0.1 for n, p in model.named_parameters()}
    idx = torch.tensor([5, 2, 9, 11, 0])
    want = per_sample_gradients(model, task, train, idx, at=shift).flat
    got = torch.empty_like(want)
    for pos, chunk in gradient_chunks(model, task, train, idx, at=shift, chunk_size=2):
        got[pos] = chunk
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    stream = GradientCache(memory_budget=TINY).stream(model, task, train, idx, at=shift)
    assert stream.storage == "recomputed"
    torch.testing.assert_close(st.streamed_products(stream, torch.eye(P, dtype=torch.float64)), want)


def test_streamed_products_equal_dense_formulas(setup):
    model, task, train, test = setup
    cache = GradientCache(memory_budget=TINY)
    stream = cache.stream(model, task, train, torch.arange(24))
    g = per_sample_gradients(model, task, train).flat  # [24, P] oracle
    gx = per_sample_gradients(model, task, test, kind="measurement").flat  # [5, P]
    w = torch.linspace(-1, 1, 24, dtype=torch.float64)[:, None]
    close = dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(st.streamed_products(stream, gx.T), g @ gx.T, **close)
    torch.testing.assert_close(st.streamed_transposed_products(stream, w), g.T @ w, **close)
    torch.testing.assert_close(st.streamed_fisher_products(stream, gx), gx @ g.T @ g, **close)
    torch.testing.assert_close(st.streamed_sq_norms(stream), g.pow(2).sum(dim=1), **close)
    assert st.streamed_mean_square(stream) == pytest.approx(g.pow(2).mean().item(), rel=1e-12)
    layers = stream.layer_slices()
    assert list(layers) == ["0", "2"]
    ms = st.streamed_layer_mean_square(stream)
    for name, sl in layers.items():
        assert ms[name] == pytest.approx(g[:, sl].pow(2).mean().item(), rel=1e-12)


def test_datainf_sums_equal_per_example_loops(setup):
    model, task, train, test = setup
    stream = GradientCache(memory_budget=TINY).stream(model, task, train, torch.arange(24))
    g = per_sample_gradients(model, task, train).flat
    gx = per_sample_gradients(model, task, test, kind="measurement").flat
    gj = g[:7]
    damping = {"0": 0.3, "2": 0.05}
    acc = st.streamed_layer_accumulate(stream, gx, damping)
    gram = st.streamed_gram(stream, gx, gj, damping)
    for name, sl in stream.layer_slices().items():
        want_acc = torch.zeros_like(gx[:, sl])
        want_gram = torch.zeros(5, 7, dtype=torch.float64)
        for gi in g[:, sl]:  # Σ_i over training examples, one at a time
            wi = 1.0 / (damping[name] + gi @ gi)
            want_acc += wi * (gx[:, sl] @ gi)[:, None] * gi[None, :]
            want_gram += wi * torch.outer(gx[:, sl] @ gi, gj[:, sl] @ gi)
        torch.testing.assert_close(acc[:, sl], want_acc, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(gram[name], want_gram, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigurationError, match="No damping"):
        st.streamed_gram(stream, gx, gj, {"0": 1.0})
