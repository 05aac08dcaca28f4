"""fungrad never uses jax's differentiation: its entry points raise while fungrad runs.

Each test computes the expected result with jax first, outside the guard; then, with
jax's public AD functions, its internal JVP/transpose tables and its internal jvp,
linearize and backward passes all replaced by functions that raise, it computes the
same result with fungrad and compares. A static test checks the sources as well.
"""

import ast
import contextlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import api as jax_api
from jax._src.interpreters import ad

import fungrad
from tests.harness import assert_close

PUBLIC_AD = ("jvp", "vjp", "linearize", "grad", "value_and_grad", "linear_transpose", "jacfwd",
             "jacrev", "hessian")
# Every function of jax's ad module that runs forward or reverse mode, where it exists in
# this jax version; `test_guard_covers_this_jax` checks that the main ones do.
AD_INTERNALS = ("jvp", "jvp_subtrace", "jvp_subtrace_2", "jvp_jaxpr", "linearize",
                "linearize_jaxpr", "linearize_subtrace", "linearize_subtrace_2",
                "backward_pass", "backward_pass3", "closed_backward_pass",
                "get_primitive_transpose", "linear_transpose", "linear_transpose2",
                "call_transpose", "call_transpose_fancy")


class ForbiddenCall(Exception):
    """Raised when jax's differentiation is used while the guard is on."""


def _forbidden(name):
    def fail(*args, **kwargs):
        del args, kwargs
        raise ForbiddenCall(f"fungrad used jax's differentiation: {name}")
    return fail


class _ForbiddenTable(dict):
    """A rule table whose every lookup raises."""

    def __init__(self, name):
        super().__init__()
        self.name = name

    def _fail(self, *args):
        raise ForbiddenCall(f"fungrad read jax's rule table {self.name}")

    __getitem__ = get = __contains__ = __iter__ = keys = items = values = _fail


@contextlib.contextmanager
def guard():
    """While active, any use of jax's AD raises `ForbiddenCall`."""
    with pytest.MonkeyPatch.context() as mp:
        for name in PUBLIC_AD:
            mp.setattr(jax, name, _forbidden(f"jax.{name}"))
            if hasattr(jax_api, name):
                mp.setattr(jax_api, name, _forbidden(f"jax._src.api.{name}"))
        for name in AD_INTERNALS:
            if hasattr(ad, name):
                mp.setattr(ad, name, _forbidden(f"jax._src.interpreters.ad.{name}"))
        for name in ("primitive_jvps", "primitive_transposes"):
            mp.setattr(ad, name, _ForbiddenTable(f"ad.{name}"))
        for trace in (ad.JVPTrace, ad.LinearizeTrace):
            mp.setattr(trace, "process_primitive", _forbidden(f"{trace.__name__}.process_primitive"))
        yield


def test_guard_covers_this_jax():
    """The guard patches real functions (so a rename in jax cannot make it vacuous), and works."""
    for name in ("jvp", "linearize", "backward_pass", "jvp_jaxpr"):
        assert callable(getattr(ad, name)), name
    with guard():
        for name in PUBLIC_AD:
            with pytest.raises(ForbiddenCall):
                getattr(jax, name)(jnp.sin)
        with pytest.raises(ForbiddenCall):
            ad.primitive_jvps.get(jax.lax.sin_p)
        with pytest.raises(ForbiddenCall):
            ad.backward_pass(None, False, (), (), ())
    x = jnp.array([0.5, 1.0])
    assert_close(jax.grad(lambda x: jnp.sum(jnp.sin(x)))(x), jnp.cos(x))  # restored


# --- the functions differentiated under the guard -----------------------------------------


@jax.custom_vjp
def _scaled_sin(x, s):
    return jnp.sin(x) * s


_scaled_sin.defvjp(lambda x, s: (jnp.sin(x) * s, (x, s)),
                   lambda res, g: (g * jnp.cos(res[0]) * res[1], jnp.sum(g * jnp.sin(res[0]))))


@fungrad.custom_jvp
def _soft_abs(x):
    return jnp.sqrt(x * x + 1.0)


@_soft_abs.defjvp
def _soft_abs_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    ans = _soft_abs(x)
    return ans, x / ans * x_dot


def _loss(w, x):
    """Mixes jit, jax.nn's custom_jvp functions, a custom_vjp and fungrad.custom_jvp."""
    h = jax.jit(lambda a, b: jnp.tanh(a @ b))(x, w)
    h = jax.nn.relu(h) + jax.nn.softplus(h) + _soft_abs(h)
    return jnp.sum(_scaled_sin(h, 1.5)) + jnp.sum(jax.nn.logsumexp(h, axis=1))


def _fwd_loss(w, x):
    """As `_loss` without the custom_vjp function, which forward mode cannot go through."""
    h = jax.jit(lambda a, b: jnp.tanh(a @ b))(x, w)
    return jnp.sum(jax.nn.relu(h) + _soft_abs(h) * jnp.sin(h))


def _args():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray(rng.standard_normal((2, 3))))


def _tangents():
    rng = np.random.default_rng(1)
    return tuple(jnp.asarray(rng.standard_normal(a.shape)) for a in _args())


# Jacobians and second order run under jax.jit (traced under the guard all the same): run
# eagerly, their many small vmapped operations take seconds to dispatch.


def test_reverse_mode_under_guard():
    args = _args()
    expected = {"grad": jax.jit(jax.grad(_loss, (0, 1)))(*args),
                "value_and_grad": jax.jit(jax.value_and_grad(_loss))(*args),
                "vjp": jax.jit(lambda *a: (_loss(*a), jax.vjp(_loss, *a)[1](jnp.float64(2.0))))(*args),
                "jacrev": jax.jit(jax.jacrev(_loss, (0, 1)))(*args)}
    with guard():
        y, pb = fungrad.vjp(_loss, *args)
        actual = {"grad": fungrad.grad(_loss, (0, 1))(*args),
                  "value_and_grad": fungrad.value_and_grad(_loss)(*args),
                  "vjp": (y, pb(jnp.float64(2.0))),
                  "jacrev": jax.jit(fungrad.jacrev(_loss, (0, 1)))(*args)}
    assert_close(actual, expected)


def test_forward_mode_under_guard():
    args, tangents = _args(), _tangents()
    y, f_jvp = jax.linearize(_fwd_loss, *args)
    expected = {"jvp": jax.jvp(_fwd_loss, args, tangents),
                "linearize": (y, f_jvp(*tangents)),
                "jacfwd": jax.jit(jax.jacfwd(_fwd_loss, (0, 1)))(*args)}
    with guard():
        y, f_jvp = fungrad.linearize(_fwd_loss, *args)
        actual = {"jvp": fungrad.jvp(_fwd_loss, args, tangents),
                  "linearize": (y, f_jvp(*tangents)),
                  "jacfwd": jax.jit(fungrad.jacfwd(_fwd_loss, (0, 1)))(*args)}
    assert_close(actual, expected)


def test_second_order_under_guard():
    w, x = _args()
    f = lambda w: _fwd_loss(w, x)
    tangent = _tangents()[0]
    expected = {"hessian": jax.jit(jax.hessian(f))(w),
                "hvp": jax.jvp(jax.grad(f), (w,), (tangent,))[1],
                "grad_of_grad": jax.jit(jax.grad(lambda w: jnp.sum(jax.grad(f)(w) ** 2)))(w)}
    with guard():
        actual = {"hessian": jax.jit(fungrad.hessian(f))(w),
                  "hvp": fungrad.hvp(f, (w,), (tangent,))[0],
                  "grad_of_grad": jax.jit(fungrad.grad(lambda w: jnp.sum(fungrad.grad(f)(w) ** 2)))(w)}
    assert_close(actual, expected)


def test_guard_catches_a_cheating_transform():
    """The guard is not vacuous: a 'fungrad' that delegated to jax would fail under it."""
    with guard(), pytest.raises(ForbiddenCall):
        jax.jvp(jnp.sin, (1.0,), (1.0,))
    with guard(), pytest.raises(ForbiddenCall):
        jax.jit(lambda x: jax.vjp(jnp.sin, x)[1](1.0))(1.0)


# --- static check of the sources -------------------------------------------------------------

FORBIDDEN_JAX_ATTRS = frozenset(PUBLIC_AD) | {"check_grads"}
FORBIDDEN_MODULES = ("jax.interpreters.ad", "jax._src.interpreters.ad", "jax.test_util",
                     "jax._src.public_test_util")
FORBIDDEN_ANYWHERE = frozenset({"primitive_jvps", "primitive_transposes", "check_grads",
                                "linear_transpose"})


def forbidden_uses(source: str) -> list[str]:
    """Uses of jax's differentiation in Python `source`: jax.grad(...), ad imports, ..."""
    tree = ast.parse(source)
    jax_names = {"jax"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "jax":
                    jax_names.add(alias.asname or "jax")
                if alias.name.startswith(FORBIDDEN_MODULES):
                    found.append(f"line {node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = {alias.name for alias in node.names}
            if module.startswith(FORBIDDEN_MODULES):
                found.append(f"line {node.lineno}: from {module} import ...")
            elif module.startswith("jax") and names & (FORBIDDEN_JAX_ATTRS | {"ad", "test_util"}):
                found.append(f"line {node.lineno}: from {module} import {sorted(names)}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            base = node.value
            if isinstance(base, ast.Name) and base.id in jax_names and node.attr in FORBIDDEN_JAX_ATTRS:
                found.append(f"line {node.lineno}: {base.id}.{node.attr}")
            elif node.attr in FORBIDDEN_ANYWHERE:
                found.append(f"line {node.lineno}: .{node.attr}")
    return found


def test_static_checker_finds_violations():
    cheats = ["import jax\ny = jax.grad(f)(x)", "import jax as j\nj.vjp(f, x)",
              "from jax import jvp", "from jax._src.interpreters import ad",
              "import jax._src.interpreters.ad", "from jax.test_util import check_grads",
              "rules = ad_module.primitive_jvps[p]"]
    for cheat in cheats:
        assert forbidden_uses(cheat), cheat
    assert not forbidden_uses('"""Unlike jax.grad, ..."""\nimport jax\njax.jit(f)\njax.vmap(g)')


def test_sources_do_not_use_jax_differentiation():
    root = pathlib.Path(fungrad.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 10
    violations = {str(p.relative_to(root)): forbidden_uses(p.read_text()) for p in files}
    assert not {k: v for k, v in violations.items() if v}
