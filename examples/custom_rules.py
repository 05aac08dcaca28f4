"""Your own derivative rules: fungrad.custom_jvp and fungrad.custom_vjp.

    python examples/custom_rules.py

1. custom_jvp, a numerically stable function: log(1 + e^x) differentiated naively gives
   inf/inf = nan for large x; a rule that says d/dx = sigmoid(x) stays finite.
2. custom_vjp, gradient clipping: the identity on the way forward, a clipped cotangent on
   the way back, so one exploding term cannot blow up the whole gradient.
3. custom_vjp, a stable vector norm: its gradient at 0 is 0 instead of nan.

The rules are honoured by fungrad's transforms and by jax's alike.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp

import fungrad

# --- 1. custom_jvp: a numerically stable log(1 + e^x) -----------------------------------------


def log1pexp_naive(x):
    return jnp.log(1.0 + jnp.exp(x))


@fungrad.custom_jvp
def log1pexp(x):
    return jnp.logaddexp(0.0, x)


@log1pexp.defjvp
def _log1pexp_jvp(primals, tangents):
    (x,), (x_dot,) = primals, tangents
    # d/dx log(1 + e^x) = e^x / (1 + e^x) = sigmoid(x): finite (and accurate) for every x
    return log1pexp(x), jax.nn.sigmoid(x) * x_dot


# --- 2. custom_vjp: clip the gradient flowing back through a value ------------------------------


@fungrad.custom_vjp
def clip_gradient(x, bound):
    return x


def _clip_fwd(x, bound):
    return x, bound  # nothing else is needed on the way back


def _clip_bwd(bound, ct):
    return jnp.clip(ct, -bound, bound), None  # no gradient for the bound


clip_gradient.defvjp(_clip_fwd, _clip_bwd)


# --- 3. custom_vjp: a norm whose gradient at 0 is 0 -----------------------------------------------


@fungrad.custom_vjp
def safe_norm(x):
    return jnp.sqrt(jnp.sum(x**2))


def _safe_norm_fwd(x):
    norm = safe_norm(x)
    return norm, (x, norm)


def _safe_norm_bwd(residuals, ct):
    x, norm = residuals
    # d|x| = x / |x|, taken as 0 at x = 0 (a subgradient) instead of 0/0
    safe = jnp.where(norm == 0, 1.0, norm)
    return (jnp.where(norm == 0, 0.0, ct / safe) * x,)


safe_norm.defvjp(_safe_norm_fwd, _safe_norm_bwd)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=7, help="how many x values to show in part 1")
    args = parser.parse_args(argv)
    results = {}

    print("1. d/dx log(1 + e^x), naive vs custom_jvp (fungrad.grad, and jax.grad of the same)")
    xs = jnp.linspace(-20.0, 100.0, args.points, dtype=jnp.float32)
    naive = jax.vmap(fungrad.grad(log1pexp_naive))(xs)
    stable = jax.vmap(fungrad.grad(log1pexp))(xs)
    reference = jax.vmap(jax.grad(log1pexp))(xs)
    for x, a, b, c in zip(xs, naive, stable, reference, strict=True):
        print(f"   x = {float(x):7.1f}   naive {float(a):<12.6g} custom {float(b):<12.6g} "
              f"jax.grad(custom) {float(c):.6g}")
    results["log1pexp"] = stable

    print("2. gradient clipping with custom_vjp: loss = 100 * clip_gradient(w, 1) ** 2 at w = 3")
    loss = lambda w: 100.0 * clip_gradient(w, 1.0) ** 2
    clipped = fungrad.grad(loss)(3.0)
    print(f"   unclipped gradient {float(fungrad.grad(lambda w: 100.0 * w**2)(3.0))}, "
          f"clipped {float(clipped)}, jax.grad agrees: {float(jax.grad(loss)(3.0))}")
    results["clip"] = clipped

    print("3. the gradient of a norm at 0")
    zero = jnp.zeros(3)
    plain = fungrad.grad(lambda x: jnp.sqrt(jnp.sum(x**2)))(zero)
    safe = fungrad.grad(safe_norm)(zero)
    away = fungrad.grad(safe_norm)(jnp.array([3.0, 4.0, 0.0]))
    print(f"   plain {plain.tolist()}   safe_norm {safe.tolist()}   "
          f"safe_norm at (3, 4, 0): {away.round(4).tolist()}")
    results["safe_norm"] = (safe, away)

    print("4. forward mode: fungrad.jvp uses a custom_jvp rule; a custom_vjp function has none")
    _, slope = fungrad.jvp(log1pexp, (jnp.float32(2.0),), (jnp.float32(1.0),))
    print(f"   fungrad.jvp(log1pexp) at 2: slope {float(slope):.6f} (sigmoid(2) = "
          f"{float(jax.nn.sigmoid(2.0)):.6f})")
    try:
        fungrad.jvp(safe_norm, (jnp.ones(3),), (jnp.ones(3),))
    except TypeError as err:
        print(f"   fungrad.jvp(safe_norm) raises, as jax.jvp does: {str(err).splitlines()[0][:90]}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
