"""A Taylor-series ODE integrator for the Lorenz system with `fungrad.jet`.

For x' = f(x), the derivatives of the solution follow from those of f along it:
x^(k+1) = (f o x)^(k). `fungrad.jet` gives (f o x)^(1..k) from x^(1..k) in one pass, so k
calls give the Taylor polynomial of x to order K, and one step is its evaluation at h.
The result is compared with a fine fourth-order Runge-Kutta reference.

    python examples/taylor_ode.py
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

import fungrad

jax.config.update("jax_enable_x64", True)

SIGMA, RHO, BETA = 10.0, 28.0, 8.0 / 3.0


def lorenz(x: jax.Array) -> jax.Array:
    """The right-hand side of the Lorenz system."""
    return jnp.stack([SIGMA * (x[1] - x[0]), x[0] * (RHO - x[2]) - x[1], x[0] * x[1] - BETA * x[2]])


def taylor_step(x: jax.Array, h: float, order: int) -> jax.Array:
    """x(t + h) from the Taylor polynomial of the solution through x, to `order`."""
    derivs = [lorenz(x)]  # x', x'', ..., each from jet of f along the path so far
    for _ in range(order - 1):
        _, f_derivs = fungrad.jet(lorenz, (x,), (tuple(derivs),))
        derivs.append(f_derivs[-1])
    return x + sum(d * h ** (k + 1) / math.factorial(k + 1) for k, d in enumerate(derivs))


def rk4_step(x: jax.Array, h: float) -> jax.Array:
    k1 = lorenz(x)
    k2 = lorenz(x + h / 2 * k1)
    k3 = lorenz(x + h / 2 * k2)
    k4 = lorenz(x + h * k3)
    return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def integrate(step: Callable[[jax.Array], jax.Array], x0: jax.Array, steps: int) -> jax.Array:
    return jax.jit(lambda x: lax.fori_loop(0, steps, lambda i, x: step(x), x))(x0)


def main(steps: int = 200, order: int = 10, t_end: float = 2.0,
         print_fn: Callable[..., None] = print) -> float:
    """Integrates from (1, 1, 1) to `t_end`; returns the largest error against RK4."""
    x0 = jnp.ones(3)
    h = t_end / steps
    taylor = integrate(lambda x: taylor_step(x, h, order), x0, steps)
    fine = 200 * steps
    reference = integrate(lambda x: rk4_step(x, t_end / fine), x0, fine)
    err = float(jnp.max(jnp.abs(taylor - reference)))
    print_fn(f"Lorenz to t={t_end}: order-{order} Taylor, {steps} steps: {taylor}")
    print_fn(f"RK4 reference, {fine} steps:              {reference}")
    print_fn(f"max abs error: {err:.2e}")
    return err


if __name__ == "__main__":
    main()
