"""The public API against jax's: pytrees, argnums, has_aux, allow_int, holomorphic, reuse, jit.

Every case calls the same function through fungrad and through jax and compares tree
structure, shapes, exact dtypes and values (`assert_same`); weak types where jax's are well
defined (`assert_same_avals`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import tree_util

import fungrad
from tests.harness import assert_close

float0 = jax.dtypes.float0


def assert_same(actual, expected, err_msg=""):
    """`assert_close`, with each leaf's dtype compared exactly.

    (`assert_close` compares `jnp.result_type`, which reads a weakly typed float32 as
    float64 when x64 is on.)
    """
    assert_close(actual, expected, err_msg=err_msg)
    for a, e in zip(tree_util.tree_leaves(actual), tree_util.tree_leaves(expected), strict=True):
        a_aval, e_aval = jax.typeof(a), jax.typeof(e)
        assert a_aval.dtype == e_aval.dtype, f"{err_msg}: {a_aval!r} != {e_aval!r}"


def assert_same_avals(actual, expected):
    """Same tree structure and the same abstract value per leaf, weak type included."""
    assert tree_util.tree_structure(actual) == tree_util.tree_structure(expected)
    for a, e in zip(tree_util.tree_leaves(actual), tree_util.tree_leaves(expected), strict=True):
        assert jax.typeof(a) == jax.typeof(e), f"{jax.typeof(a)!r} != {jax.typeof(e)!r}"


def _params():
    rng = np.random.default_rng(0)
    return {
        "w": jnp.asarray(rng.standard_normal((3, 2))),
        "layers": [(jnp.asarray(rng.standard_normal(2), jnp.float32), None),
                   {"scale": jnp.float64(1.5), "empty": ()}],
    }


def _loss(params, x):
    """A scalar of a nested pytree (dict, list, tuple, None leaves) and an array."""
    h = jnp.tanh(x @ params["w"])
    (b, _), last = params["layers"]
    return jnp.sum(jnp.sin(h + b.astype(h.dtype)) * last["scale"])


def _loss_aux(params, x):
    loss = _loss(params, x)
    return loss, {"loss": loss, "h": x * 2.0, "nothing": None, "tag": (jnp.arange(2),)}


X = jnp.linspace(-1.0, 1.0, 6).reshape(2, 3)


# --- grad and value_and_grad: pytrees, argnums, has_aux ----------------------------------


@pytest.mark.parametrize("argnums", [0, 1, -1, -2, (0,), (1, 0), (-1, 0)])
def test_grad_pytrees_and_argnums(argnums):
    args = (_params(), X)
    assert_same(fungrad.grad(_loss, argnums)(*args), jax.grad(_loss, argnums)(*args))
    assert_same(fungrad.value_and_grad(_loss, argnums)(*args),
                 jax.value_and_grad(_loss, argnums)(*args))


@pytest.mark.parametrize("transform", ["grad", "value_and_grad"])
def test_grad_has_aux(transform):
    args = (_params(), X)
    ours = getattr(fungrad, transform)(_loss_aux, argnums=(0, 1), has_aux=True)(*args)
    theirs = getattr(jax, transform)(_loss_aux, argnums=(0, 1), has_aux=True)(*args)
    assert_same(ours, theirs)


def test_grad_of_python_scalars_keeps_weak_type():
    for f in (lambda x: x * x, lambda x: jnp.sin(x) * 2.0):
        assert_same_avals(fungrad.grad(f)(3.0), jax.grad(f)(3.0))
        assert_same_avals(fungrad.value_and_grad(f)(3.0), jax.value_and_grad(f)(3.0))
    f32 = jnp.float32(0.5)
    assert_same_avals(fungrad.grad(jnp.tanh)(f32), jax.grad(jnp.tanh)(f32))


def test_zero_derivatives_at_python_scalars_are_weakly_typed():
    # An unused argument's gradient, a constant function's, a constant output's tangent:
    # symbolic zeros made arrays, weakly typed where the value is, as jax's are.
    unused = lambda x, y: x * 2  # noqa: E731
    assert_same_avals(fungrad.grad(unused, argnums=(0, 1))(1.0, 2.0),
                      jax.grad(unused, argnums=(0, 1))(1.0, 2.0))
    assert_same_avals(fungrad.grad(lambda x: 3.0)(1.0), jax.grad(lambda x: 3.0)(1.0))
    constant = lambda x: (x, 2.0)  # noqa: E731
    assert_same_avals(fungrad.jvp(constant, (1.0,), (1.0,))[1],
                      jax.jvp(constant, (1.0,), (1.0,))[1])
    assert_same_avals(fungrad.jacfwd(unused, argnums=1)(1.0, 2.0),
                      jax.jacfwd(unused, argnums=1)(1.0, 2.0))


def test_grad_weak_type_through_promotion():
    """A weak input promoted to a strong dtype: the cotangent goes back to weak, as in jax."""
    f = lambda x: jnp.float64(3.0) * jnp.sin(x)
    assert_same_avals(fungrad.grad(f)(3.0), jax.grad(f)(3.0))
    assert_same_avals(fungrad.vjp(f, 3.0)[1](jnp.float64(1.0)), jax.vjp(f, 3.0)[1](jnp.float64(1.0)))


def test_grad_keyword_arguments():
    def f(x, y, *, scale, power=2):
        return scale * jnp.sum(x ** power * jnp.cos(y))

    x, y = jnp.array([0.5, -1.0]), jnp.array([0.3, 0.7])
    for argnums in (0, (0, 1)):
        assert_same(fungrad.grad(f, argnums)(x, y, scale=1.5, power=3),
                     jax.grad(f, argnums)(x, y, scale=1.5, power=3))
        assert_same(fungrad.value_and_grad(f, argnums)(x, y, scale=2.0),
                     jax.value_and_grad(f, argnums)(x, y, scale=2.0))


def test_static_python_arguments_in_control_flow():
    """Strings and Python ints outside argnums reach the function as they are."""
    def f(x, mode, n):
        y = jnp.sin(x) if mode == "sin" else jnp.exp(x)
        for _ in range(n):
            y = y * x
        return jnp.sum(y)

    x = jnp.array([0.2, -0.4, 1.1])
    for mode, n in (("sin", 2), ("exp", 0), ("sin", 1)):
        assert_same(fungrad.grad(f)(x, mode, n), jax.grad(f)(x, mode, n))
    assert_same(fungrad.jacrev(f)(x, "exp", 1), jax.jacrev(f)(x, "exp", 1))
    hessian = lambda hessian: jax.jit(hessian(f), static_argnums=(1, 2))(x, "sin", 1)
    assert_same(hessian(fungrad.hessian), hessian(jax.hessian))


# --- allow_int, holomorphic, integer inputs and outputs -----------------------------------


def test_allow_int_gives_float0_gradients():
    def f(x, n, flags):
        return jnp.sum(x * n) + jnp.sum(jnp.where(flags, x, 0.0))

    args = (jnp.array([1.0, 2.0]), jnp.array([3, 4]), jnp.array([True, False]))
    for argnums in (1, (0, 1, 2), (2, 0)):
        ours = fungrad.grad(f, argnums, allow_int=True)(*args)
        theirs = jax.grad(f, argnums, allow_int=True)(*args)
        assert_same(ours, theirs)
        assert float0 in {leaf.dtype for leaf in tree_util.tree_leaves(ours)}
    assert_same(fungrad.grad(lambda x, k: x * k, (0, 1), allow_int=True)(2.0, 3),
                 jax.grad(lambda x, k: x * k, (0, 1), allow_int=True)(2.0, 3))
    assert_same(fungrad.jacrev(f, (0, 1), allow_int=True)(*args),
                 jax.jacrev(f, (0, 1), allow_int=True)(*args))


def _holo(z):
    return jnp.sum(jnp.sin(z) * z + jnp.exp(2.0 * z))


def test_holomorphic():
    z = jnp.array([0.5 + 0.25j, -1.0 + 2.0j], jnp.complex128)
    w = jnp.complex64(0.3 - 0.7j)
    assert_same(fungrad.value_and_grad(_holo, holomorphic=True)(z),
                 jax.value_and_grad(_holo, holomorphic=True)(z))
    assert_same(fungrad.grad(_holo, holomorphic=True)(w), jax.grad(_holo, holomorphic=True)(w))
    g = lambda z: {"a": z * z, "b": jnp.exp(z)}
    for name in ("jacfwd", "jacrev"):
        jac = lambda module, name=name: jax.jit(getattr(module, name)(g, holomorphic=True))(z)
        assert_same(jac(fungrad), jac(jax), err_msg=name)


def test_non_holomorphic_complex_through_vjp_and_jvp():
    f = lambda z: jnp.real(z * jnp.conj(z)) + jnp.imag(z) ** 2
    z = jnp.array([0.5 + 0.25j, -1.0 + 2.0j])
    assert_same(fungrad.vjp(f, z)[1](jnp.ones(2)), jax.vjp(f, z)[1](jnp.ones(2)))
    t = jnp.array([1.0 - 1.0j, 0.5j])
    assert_same(fungrad.jvp(f, (z,), (t,)), jax.jvp(f, (z,), (t,)))


def test_integer_inputs_with_float0_tangents():
    def f(x, n, b):
        return x * n, jnp.where(b, n, 2 * n), jnp.sum(x)

    args = (jnp.array([1.0, 2.0]), jnp.array([3, 4], jnp.int32), jnp.array([True, False]))
    tangents = (jnp.array([0.5, -1.0]), np.zeros(2, float0), np.zeros(2, float0))
    ours, theirs = fungrad.jvp(f, args, tangents), jax.jvp(f, args, tangents)
    assert_same(ours, theirs)
    assert ours[1][1].dtype == float0  # an integer output gets a float0 tangent
    out, f_jvp = fungrad.linearize(f, *args)
    assert_same((out, f_jvp(*tangents)), jax.jvp(f, args, tangents))


def test_integer_outputs_and_inputs_in_vjp():
    def f(x, n):
        return {"y": jnp.sin(x) * n, "idx": jnp.argmax(x), "pos": x > 0}

    args = (jnp.array([0.3, -1.0, 2.0]), jnp.array([1, 2, 3]))
    (y, pb), (y_jax, pb_jax) = fungrad.vjp(f, *args), jax.vjp(f, *args)
    assert_same(y, y_jax)
    ct = {"y": jnp.array([1.0, 2.0, 3.0]), "idx": np.zeros((), float0),
          "pos": np.zeros(3, float0)}
    assert_same(pb(ct), pb_jax(ct))
    assert pb(ct)[1].dtype == float0


# --- jvp, linearize and vjp: pytrees, has_aux, reuse, jit ----------------------------------


def _tree_fun(p, x):
    h = jnp.tanh(x @ p["w"])
    return {"h": h, "stats": (jnp.sum(h), [jnp.max(h, axis=1)]), "none": None}


def _tree_args():
    return ({"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2)}, X)


def _tree_tangents(seed=1):
    rng = np.random.default_rng(seed)
    return tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                              _tree_args())


def test_jvp_pytrees_and_lists():
    args, tangents = _tree_args(), _tree_tangents()
    assert_same(fungrad.jvp(_tree_fun, args, tangents), jax.jvp(_tree_fun, args, tangents))
    # lists are accepted for primals and tangents, as in jax
    assert_same(fungrad.jvp(_tree_fun, list(args), list(tangents)),
                 jax.jvp(_tree_fun, list(args), list(tangents)))


def _with_aux(p, x):
    out = _tree_fun(p, x)
    return out["h"], {"sum": out["stats"][0], "label": None, "count": jnp.int32(7)}


def test_has_aux_jvp_vjp_linearize():
    args, tangents = _tree_args(), _tree_tangents()
    assert_same(fungrad.jvp(_with_aux, args, tangents, has_aux=True),
                 jax.jvp(_with_aux, args, tangents, has_aux=True))
    y, pb, aux = fungrad.vjp(_with_aux, *args, has_aux=True)
    y_j, pb_j, aux_j = jax.vjp(_with_aux, *args, has_aux=True)
    ct = jnp.ones_like(y_j)
    assert_same((y, pb(ct), aux), (y_j, pb_j(ct), aux_j))
    y, f_jvp, aux = fungrad.linearize(_with_aux, *args, has_aux=True)
    y_j, f_jvp_j, aux_j = jax.linearize(_with_aux, *args, has_aux=True)
    assert_same((y, f_jvp(*tangents), aux), (y_j, f_jvp_j(*tangents), aux_j))


def test_linearize_called_many_times():
    args = _tree_args()
    y, f_jvp = fungrad.linearize(_tree_fun, *args)
    y_j, f_jvp_j = jax.linearize(_tree_fun, *args)
    assert_same(y, y_j)
    for seed in range(3):
        tangents = _tree_tangents(seed)
        assert_same(f_jvp(*tangents), f_jvp_j(*tangents))
    tangents = _tree_tangents(7)
    assert_same(jax.jit(f_jvp)(*tangents), f_jvp_j(*tangents))


def test_vjp_fun_many_times_and_through_jit():
    args = _tree_args()
    y, pb = fungrad.vjp(_tree_fun, *args)
    y_j, pb_j = jax.vjp(_tree_fun, *args)
    assert_same(y, y_j)
    rng = np.random.default_rng(0)
    cts = [tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), y_j)
           for _ in range(3)]
    for ct in cts:
        assert_same(pb(ct), pb_j(ct))
    jitted = jax.jit(pb)
    applied = jax.jit(lambda fun, ct: fun(ct))  # vjp_fun is a pytree: a valid jit argument
    for ct in cts[:2]:
        assert_same(jitted(ct), pb_j(ct))
        assert_same(applied(pb, ct), pb_j(ct))


def test_python_scalars_in_jvp_vjp_linearize():
    f = lambda x, y: jnp.sin(x) * y
    assert_same(fungrad.jvp(f, (0.5, 2.0), (1.0, -1.0)), jax.jvp(f, (0.5, 2.0), (1.0, -1.0)))
    y, pb = fungrad.vjp(f, 0.5, 2.0)
    y_j, pb_j = jax.vjp(f, 0.5, 2.0)
    assert_same((y, pb(1.0)), (y_j, pb_j(1.0)))
    y, f_jvp = fungrad.linearize(f, 0.5, 2.0)
    y_j, f_jvp_j = jax.linearize(f, 0.5, 2.0)
    assert_same((y, f_jvp(1.0, 3.0)), (y_j, f_jvp_j(1.0, 3.0)))


# --- Jacobians, Hessians, hvp -------------------------------------------------------------


def _two_args(x, y):
    return {"prod": jnp.outer(x, y), "pair": (jnp.sum(jnp.sin(x)) * jnp.sum(y), jnp.exp(y))}


# Jacobians and Hessians mostly run under jax.jit here, as they do in practice: eagerly,
# their many small vmapped operations are slow to dispatch. test_jacobians_has_aux_and_keywords
# runs them eagerly.


@pytest.mark.parametrize("argnums", [0, (-1, 0)])
def test_jacobians_argnums_and_pytree_outputs(argnums):
    x, y = jnp.array([0.5, -1.0, 2.0]), jnp.array([0.25, 0.75], jnp.float32)
    for name in ("jacfwd", "jacrev"):
        jac = lambda module, name=name: jax.jit(getattr(module, name)(_two_args, argnums))(x, y)
        assert_same(jac(fungrad), jac(jax), err_msg=name)


@pytest.mark.parametrize("argnums", [0, (1, 0)])
def test_hessian_argnums(argnums):
    f = lambda x, p: jnp.sum(jnp.sin(x) * p["a"] ** 2) + jnp.sum(x * x) * p["b"]
    x, p = jnp.array([0.5, -1.0]), {"a": jnp.array([1.5, 0.5]), "b": jnp.float64(0.3)}
    assert_same(jax.jit(fungrad.hessian(f, argnums))(x, p), jax.jit(jax.hessian(f, argnums))(x, p))


def test_jacobians_has_aux_and_keywords():
    def f(x, *, scale):
        return jnp.sin(x) * scale, {"norm": jnp.sum(x * x), "k": 3}

    x = jnp.array([0.5, -1.0, 2.0])
    for name in ("jacfwd", "jacrev"):
        assert_same(getattr(fungrad, name)(f, has_aux=True)(x, scale=2.0),
                     getattr(jax, name)(f, has_aux=True)(x, scale=2.0))
    g = lambda x, *, scale: (jnp.sum(jnp.sin(x)) * scale, jnp.max(x))
    assert_same(jax.jit(fungrad.hessian(g, has_aux=True))(x, scale=0.5),
                 jax.jit(jax.hessian(g, has_aux=True))(x, scale=0.5))


def test_hvp_is_shaped_like_primals():
    f = lambda p, x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2) * p["c"]
    primals = ({"w": jnp.linspace(-1.0, 1.0, 6).reshape(3, 2), "c": jnp.float64(1.5)}, X)
    rng = np.random.default_rng(3)
    tangents = tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                                  primals)
    expected = jax.jvp(jax.grad(f, argnums=(0, 1)), primals, tangents)[1]
    out = fungrad.hvp(f, primals, tangents)
    assert isinstance(out, tuple) and len(out) == 2
    assert_same(out, expected)
    assert_same(fungrad.hvp(f, list(primals), list(tangents)), expected)
