"""Deeply nested control flow: derivatives equal jax's, and the work to trace them grows
linearly with the depth of nesting (each level used to redo the levels inside it twice)."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fungrad
from benchmarks.scaling import nested as _nested  # the functions the benchmark times
from fungrad._src import jaxutil, linearize
from tests.harness import assert_close, check_finite_differences

KINDS = ["cond", "switch", "scan", "while"]


def _derivatives(lib, f, x, forward_only):
    """What the tests compare: jvp, and grad and hessian (or, for a while loop, which has
    no reverse mode, forward over forward)."""
    out = {"jvp": lib.jvp(f, (x,), (jnp.ones_like(x),))}
    if forward_only:
        out["jacfwd of jacfwd"] = lib.jacfwd(lib.jacfwd(f))(x)
    else:
        out["grad"] = lib.grad(f)(x)
        out["hessian"] = lib.hessian(f)(x)
    return out


@pytest.mark.parametrize("depth", [1, 3, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_derivatives_of_nesting_equal_jax(kind, depth):
    f = _nested(kind, depth)
    x = np.float64(0.7)
    expected = jax.jit(lambda x: _derivatives(jax, f, x, kind == "while"))(x)
    actual = jax.jit(lambda x: _derivatives(fungrad, f, x, kind == "while"))(x)
    for name in expected:
        assert_close(actual[name], expected[name], err_msg=name)


@pytest.mark.parametrize("depth", [1, 3, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_derivatives_of_nesting_match_finite_differences(kind, depth):
    f = _nested(kind, depth)
    x = np.float64(0.7)
    rng = np.random.default_rng(depth)
    check_finite_differences(f, (x,), rng)
    if kind != "while":  # the hessian, forward over reverse, against differences of the grad
        check_finite_differences(fungrad.grad(f), (x,), rng)


def _transform(name, f):
    if name == "grad":
        return fungrad.grad(f)
    if name == "hessian":
        return fungrad.hessian(f)
    return lambda x: fungrad.jvp(f, (x,), (jnp.ones_like(x),))


def _work(monkeypatch, kind, name, depth):
    """Partial evaluations run and equations traced by fungrad while `jax.make_jaxpr`
    traces `name` of `depth` levels of `kind`, from empty caches."""
    counts = collections.Counter()
    partial_eval, trace_to_jaxpr = linearize.partial_eval, jaxutil.trace_to_jaxpr

    def counted_partial_eval(*args, **kwargs):
        counts["partial evals"] += 1
        return partial_eval(*args, **kwargs)

    def counted_trace(*args, **kwargs):
        closed = trace_to_jaxpr(*args, **kwargs)
        counts["traced eqns"] += len(closed.jaxpr.eqns)
        return closed

    monkeypatch.setattr(linearize, "partial_eval", counted_partial_eval)
    monkeypatch.setattr(jaxutil, "trace_to_jaxpr", counted_trace)
    fungrad.clear_caches()
    jax.make_jaxpr(_transform(name, _nested(kind, depth)))(0.5)
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize("kind,name", [(k, t) for k in KINDS for t in ("grad", "hessian", "jvp")
                                       if k != "while" or t == "jvp"])
def test_work_grows_linearly_with_nesting(monkeypatch, kind, name):
    small, large = _work(monkeypatch, kind, name, 4), _work(monkeypatch, kind, name, 8)
    assert large["traced eqns"] > small["traced eqns"] > 0
    for what in ("partial evals", "traced eqns"):
        assert large[what] <= 2.5 * small[what] + 10, (what, small[what], large[what])
