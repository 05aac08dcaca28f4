"""Every user-facing error: what went wrong, what was expected, and how to fix it."""

import os
import re
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import source_info_util
from jax.extend.core import Primitive

import fungrad
import fungrad.extend
from fungrad._src.rules import RULES_HOME

X = jnp.array([0.5, -1.0, 2.0])


def _raises(exc, *fragments):
    """pytest.raises matching every fragment (literal text) in order."""
    return pytest.raises(exc, match=".*".join(map(re.escape, fragments)))


# --- grad's output -------------------------------------------------------------------------


def test_grad_of_non_scalar_output():
    with _raises(TypeError, "grad is only defined for scalar-output functions",
                 "output had shape (3,)", "Use fungrad.vjp or fungrad.jacrev"):
        fungrad.grad(jnp.sin)(X)


def test_grad_of_pytree_output_suggests_has_aux():
    with _raises(TypeError, "grad requires fun to return a single scalar array",
                 "Did you mean has_aux=True?"):
        fungrad.grad(lambda x: (jnp.sum(x), x))(X)


def test_grad_of_integer_output():
    with _raises(TypeError, "grad requires real-valued outputs", "but got int32",
                 "use fungrad.vjp directly"):
        fungrad.grad(lambda x: jnp.sum(x).astype(jnp.int32))(X)


def test_grad_of_complex_output():
    with _raises(TypeError, "value_and_grad requires real-valued outputs", "but got complex64",
                 "pass holomorphic=True"):
        fungrad.value_and_grad(lambda x: jnp.sum(x).astype(jnp.complex64))(X)


def test_jacrev_of_integer_output():
    with _raises(TypeError, "jacrev requires real-valued outputs", "but got int64"):
        fungrad.jacrev(lambda x: jnp.floor(x).astype(jnp.int64))(X)


# --- input dtypes --------------------------------------------------------------------------


def test_integer_input_without_allow_int():
    with _raises(TypeError, "grad requires real- or complex-valued inputs", "but got int32",
                 "set allow_int to True"):
        fungrad.grad(lambda n: jnp.sum(n * 2.0))(jnp.arange(3, dtype=jnp.int32))
    with _raises(TypeError, "jacrev requires real- or complex-valued inputs", "but got bool"):
        fungrad.jacrev(lambda b: jnp.where(b, 1.0, 0.0))(jnp.array([True]))


def test_jacfwd_integer_input():
    with _raises(TypeError, "jacfwd requires real-valued inputs", "but got int64",
                 "use fungrad.jvp directly"):
        fungrad.jacfwd(lambda n: n * 2.0)(jnp.arange(3))


def test_holomorphic_with_real_input():
    with _raises(TypeError, "grad with holomorphic=True requires inputs with complex dtype",
                 "but got float64", "Pass complex inputs"):
        fungrad.grad(lambda x: x * x, holomorphic=True)(1.0)
    with _raises(TypeError, "jacfwd with holomorphic=True requires inputs with complex dtype"):
        fungrad.jacfwd(jnp.sin, holomorphic=True)(X)


def test_holomorphic_with_real_output():
    with _raises(TypeError, "grad with holomorphic=True requires outputs with complex dtype",
                 "but got float64", "drop holomorphic=True"):
        fungrad.grad(jnp.real, holomorphic=True)(1.0 + 2.0j)


# --- tangents and cotangents ----------------------------------------------------------------


def test_jvp_tangent_of_wrong_shape():
    with _raises(ValueError, "jvp: the tangent at tangents[1]['b'] has shape (4,)",
                 "the corresponding primal has shape (3,)"):
        fungrad.jvp(lambda x, p: x * p["b"], (X, {"b": X}), (X, {"b": jnp.ones(4)}))


def test_jvp_tangent_of_wrong_dtype():
    with _raises(TypeError, "jvp: the tangent at tangents[0] has dtype float32",
                 "primal has dtype float64", "expected dtype is float64",
                 ".astype(jnp.float64)"):
        fungrad.jvp(jnp.sin, (X,), (X.astype(jnp.float32),))


def test_jvp_integer_primal_needs_float0_tangent():
    with _raises(TypeError, "has dtype float64", "primal has dtype int64",
                 "expected dtype is float0", "dtype=jax.dtypes.float0"):
        fungrad.jvp(lambda n: n * 2, (jnp.arange(3),), (jnp.ones(3),))


def test_linearize_tangent_of_wrong_shape():
    _, f_jvp = fungrad.linearize(jnp.sin, X)
    with _raises(ValueError, "linearize's f_jvp: the tangent at tangents[0] has shape (2,)",
                 "primal has shape (3,)"):
        f_jvp(jnp.ones(2))


def test_mismatched_primal_and_tangent_structure():
    with _raises(TypeError, "jvp: primals and tangents must have the same tree structure",
                 "primals is PyTreeDef(({'a': *},))", "tangents is PyTreeDef(({'b': *},))"):
        fungrad.jvp(lambda p: p["a"], ({"a": X},), ({"b": X},))
    with _raises(TypeError, "hvp: primals and tangents must have the same tree structure"):
        fungrad.hvp(lambda x, y: jnp.sum(x * y), (X, X), (X,))


def test_primals_not_a_tuple():
    with _raises(TypeError, "jvp: primals must be a tuple or a list", "got ArrayImpl",
                 "Wrap a single argument as (primal,)"):
        fungrad.jvp(jnp.sin, X, (X,))
    with _raises(TypeError, "jvp: tangents must be a tuple or a list", "(tangent,)"):
        fungrad.jvp(jnp.sin, (X,), X)
    with _raises(TypeError, "hvp: primals must be a tuple or a list"):
        fungrad.hvp(lambda x: jnp.sum(x * x), X, X)


def test_vjp_fun_cotangent_of_wrong_shape_dtype_or_structure():
    _, vjp_fun = fungrad.vjp(lambda x: {"y": jnp.sin(x)}, X)
    with _raises(ValueError, "vjp_fun: the cotangent at ['y'] has shape (2,)",
                 "the corresponding output of fun has shape (3,)"):
        vjp_fun({"y": jnp.ones(2)})
    with _raises(TypeError, "vjp_fun: the cotangent at ['y'] has dtype float32",
                 "expected dtype is float64"):
        vjp_fun({"y": jnp.ones(3, jnp.float32)})
    with _raises(TypeError, "vjp_fun: the primal output and the cotangent must have the same "
                 "tree structure"):
        vjp_fun(jnp.ones(3))


# --- argnums, has_aux, argument types --------------------------------------------------------


def test_argnums_out_of_range():
    f = lambda a, b: a * b
    with _raises(ValueError, "grad: argnums=2 is out of bounds", "2 positional arguments",
                 "in [-2, 2)"):
        fungrad.grad(f, argnums=2)(1.0, 2.0)
    with _raises(ValueError, "value_and_grad: argnums=(0, -3) is out of bounds"):
        fungrad.value_and_grad(f, argnums=(0, -3))(1.0, 2.0)
    with _raises(ValueError, "jacrev: argnums=5 is out of bounds"):
        fungrad.jacrev(f, argnums=5)(X, X)
    with _raises(TypeError, "grad: argnums must be an int or a tuple of ints, got 'a'"):
        fungrad.grad(f, argnums="a")(1.0, 2.0)


def test_has_aux_with_a_non_pair():
    with _raises(TypeError, "grad with has_aux=True requires the function to return a pair "
                 "(output, aux)", "a single array of shape ()", "or pass has_aux=False"):
        fungrad.grad(lambda x: x * 2.0, has_aux=True)(1.0)
    with _raises(TypeError, "vjp with has_aux=True", "a tuple of length 3"):
        fungrad.vjp(lambda x: (x, x, x), X, has_aux=True)
    with _raises(TypeError, "jvp with has_aux=True", "a single array of shape (3,)"):
        fungrad.jvp(jnp.sin, (X,), (X,), has_aux=True)


def test_non_array_leaf_in_differentiated_inputs():
    with _raises(TypeError, "grad: args[1]['name'] is of type str, which is not a valid JAX type",
                 "outside argnums"):
        fungrad.grad(lambda x, p: x * p["w"], argnums=1)(2.0, {"w": 1.0, "name": "layer"})
    with _raises(TypeError, "vjp: primals[1] is of type str", "close over other values"):
        fungrad.vjp(lambda x, s: x, X, "mode")
    with _raises(TypeError, "jvp: primals[0] is of type str"):
        fungrad.jvp(lambda s: s, ("mode",), ("mode",))
    with _raises(TypeError, "jacfwd: args[0][1] is of type object"):
        fungrad.jacfwd(lambda t: t[0])([X, object()])


def test_python_control_flow_on_a_differentiated_value_under_jit():
    # Outside jit the path taken is differentiated (tests/test_capture.py); under jit the
    # value is abstract and the error is jax's own.
    for lib in (jax, fungrad):
        with _raises(jax.errors.ConcretizationTypeError, "Attempted boolean conversion"):
            jax.jit(lib.grad(lambda x: x if x > 0 else -x))(1.0)


# --- missing rules, custom_vjp in forward mode -----------------------------------------------

_no_rule_p = Primitive("fungrad_test_no_rule")
_no_rule_p.def_impl(lambda x: x * 2.0)
_no_rule_p.def_abstract_eval(lambda x: x)


def _uses_no_rule(x):
    return jnp.sum(_no_rule_p.bind(x))  # the line the error must point at


def test_primitive_without_a_rule_names_it_and_the_user_line():
    eqn = jax.make_jaxpr(_uses_no_rule)(X).eqns[0]
    where = source_info_util.summarize(eqn.source_info)
    assert "test_errors.py" in where and "_uses_no_rule" in where  # jax records the line
    for run in (lambda: fungrad.grad(_uses_no_rule)(X),
                lambda: fungrad.jvp(_uses_no_rule, (X,), (X,)),
                lambda: jax.jit(fungrad.grad(_uses_no_rule))(X),
                lambda: fungrad.grad(jax.jit(_uses_no_rule))(X)):
        with _raises(NotImplementedError, "no differentiation rule for primitive "
                     "'fungrad_test_no_rule'", f"(at {where})", f"Rules live in {RULES_HOME}",
                     "fungrad.extend.defjvp"):
            run()


_no_transpose_p = Primitive("fungrad_test_no_transpose")
_no_transpose_p.def_impl(lambda x: x * 2.0)
_no_transpose_p.def_abstract_eval(lambda x: x)
fungrad.extend.defjvp(_no_transpose_p, lambda t, x: _no_transpose_p.bind(t))


def test_linear_primitive_without_a_transpose_rule():
    f = lambda x: jnp.sum(_no_transpose_p.bind(x))
    y, y_dot = fungrad.jvp(f, (X,), (X,))  # forward mode needs no transpose
    np.testing.assert_allclose(y_dot, 2 * jnp.sum(X))
    with _raises(NotImplementedError, "no transpose rule for primitive "
                 "'fungrad_test_no_transpose'", "test_errors.py", "reverse mode",
                 f"Rules live in {RULES_HOME}", "transpose_rules"):
        fungrad.grad(f)(X)


@jax.custom_vjp
def _clip_gradient(x):
    return jnp.sin(x)


_clip_gradient.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (jnp.clip(g * jnp.cos(x), -1, 1),))


def test_forward_mode_of_a_custom_vjp_whose_bwd_is_not_linear():
    # jax refuses every custom_vjp in forward mode; fungrad transposes bwd, so it refuses
    # only a bwd that is not linear in the cotangent, and names what breaks linearity.
    for run in (lambda: fungrad.jvp(_clip_gradient, (X,), (X,)),
                lambda: fungrad.linearize(_clip_gradient, X)[1](X),
                lambda: fungrad.jacfwd(_clip_gradient)(X)):
        with _raises(TypeError, "by transposing its bwd", "must be linear in the cotangent",
                     "test_errors.py", "is not linear in the cotangent: it applies `m",
                     "custom_jvp rule for forward mode",
                     "reverse mode (grad, vjp, jacrev)"):
            run()


def test_a_non_callable_is_rejected_when_the_transform_is_made():
    for make in (fungrad.grad, fungrad.value_and_grad, fungrad.jacfwd, fungrad.jacrev,
                 fungrad.hessian):
        with _raises(TypeError, "expected a callable value", "got 3.0"):
            make(3.0)
    with _raises(TypeError, "vjp: expected a callable value"):
        fungrad.vjp(3.0, 1.0)


def test_tracebacks_leave_out_fungrads_frames_as_jax_leaves_out_its_own():
    def f(x):
        return jnp.dot(x, jnp.ones(4))

    with pytest.raises(TypeError, match="dot_general requires contracting dimensions") as info:
        fungrad.grad(f)(jnp.ones(3))
    files = [frame.filename for frame in traceback.extract_tb(info.value.__traceback__)]
    assert any(name.endswith("test_errors.py") for name in files)
    package = os.path.dirname(os.path.abspath(fungrad.__file__)) + os.sep
    assert not any(os.path.abspath(name).startswith(package) for name in files), files


def test_an_integer_outputs_cotangent_may_be_integer_zeros_as_in_jax():
    def f(x):
        return x * 2.0, jnp.round(x).astype(jnp.int32)

    y, pullback = fungrad.vjp(f, 1.5)
    ct = (jnp.ones_like(y[0]), jnp.zeros_like(y[1]))  # integer zeros for the integer output
    assert pullback(ct)[0] == jax.vjp(f, 1.5)[1](ct)[0]


def test_a_concretization_error_names_the_users_function_and_argument():
    def loss(weights, scale):
        return weights * float(weights) * scale

    with _raises(jax.errors.ConcretizationTypeError, "tracing the function loss at",
                 "for fungrad.grad", "the argument weights"):
        fungrad.grad(loss)(2.0, 3.0)
    with _raises(jax.errors.ConcretizationTypeError, "for fungrad.jacrev",
                 "the argument params['w']"):
        fungrad.jacrev(lambda params, n: params["w"] * float(params["w"][0]))(
            {"w": jnp.ones(2)}, 3)


def test_debug_nans_raises_a_floating_point_error_as_in_jax():
    with jax.debug_nans(True):
        for lib in (jax, fungrad):
            for _ in range(2):  # the op-by-op first call and the compiled second
                with pytest.raises(FloatingPointError, match="invalid value \\(nan\\)"):
                    lib.grad(jnp.linalg.norm)(jnp.zeros(3))


def test_a_custom_jvp_rule_closing_over_a_differentiated_value_is_refused():
    def f(x):
        @jax.custom_jvp
        def h(y):
            return jnp.sin(y) * x

        @h.defjvp
        def h_jvp(primals, tangents):
            return h(primals[0]), jnp.cos(primals[0]) * x * tangents[0]

        return h(2.0 * x)

    with _raises(TypeError, "with respect to a value its rule closes over",
                 "Pass that value as an argument"):
        fungrad.grad(f)(0.5)


def test_a_custom_vjp_rule_fungrad_cannot_trace_at_capture_says_what_to_do():
    # Its fwd closes over a vmapped value and its bwd branches on a residual's value:
    # fungrad cannot trace the bwd while the vmap lives, nor run the fwd after it.
    def f(x):
        def per(c):
            g = jax.custom_vjp(lambda y: jnp.sin(y) * c)
            g.defvjp(lambda y: (g(y), jnp.ones(())),
                     lambda r, ct: ((c * ct if r > 0 else ct),))
            return g(x)

        return jnp.sum(jax.vmap(per)(jnp.arange(3.0)))

    with _raises(NotImplementedError, "custom_vjp", "jax.vmap",
                 "Pass that value as an argument of the custom_vjp function"):
        fungrad.grad(f)(0.5)


def test_a_custom_vjp_rule_closing_over_a_differentiated_value_is_refused():
    # Its fwd and bwd read x itself: they say nothing of how x moves the function.
    def f(x):
        g = jax.custom_vjp(lambda y: jnp.sin(y) * x)
        g.defvjp(lambda y: (g(y), jnp.cos(y)), lambda r, ct: (r * x * ct,))
        return g(2.0 * x)

    with _raises(TypeError, "with respect to a value its fwd or bwd closes over",
                 "Pass that value as an argument of the custom_vjp function"):
        fungrad.grad(f)(0.5)
