"""Newton's method with Hessian-vector products and conjugate gradients, against gradient descent.

    python examples/newton_cg.py
    python examples/newton_cg.py --dim 200 --condition 1e6

The problem is L2-regularized logistic regression whose features are scaled over several
orders of magnitude, so the Hessian is badly conditioned and gradient descent crawls.
Newton-CG never forms the Hessian: conjugate gradients solve H d = -g using only
fungrad.hvp (forward-over-reverse), one Hessian-vector product per CG iteration.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

import fungrad


def make_problem(n: int, dim: int, condition: float, seed: int = 0):
    """Features with column scales from 1 to `condition`**0.5, labels from a noisy linear model."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0.0, 0.5 * np.log10(condition), dim)
    x = rng.standard_normal((n, dim)) * scales
    w_true = rng.standard_normal(dim) / scales
    y = (x @ w_true + 0.5 * rng.standard_normal(n) > 0).astype(np.float64)
    return jnp.asarray(x), jnp.asarray(y)


def make_loss(x, y, l2: float = 1e-3):
    def loss(w):
        logits = x @ w
        # log(1 + e^z) - y z, written stably
        return jnp.mean(jnp.logaddexp(0.0, logits) - y * logits) + 0.5 * l2 * jnp.sum(w**2)
    return loss


def conjugate_gradient(matvec, b, iters: int, tol: float = 1e-10):
    """Solve A x = b for symmetric positive definite A, given only x -> A x."""
    def body(_, state):
        x, r, p, rr = state
        ap = matvec(p)
        alpha = rr / jnp.vdot(p, ap)
        x, r = x + alpha * p, r - alpha * ap
        rr_new = jnp.vdot(r, r)
        p = r + (rr_new / rr) * p
        # Once converged, keep the state (avoids 0/0 on the next iteration).
        done = rr < tol**2
        return jax.tree_util.tree_map(lambda old, new: jnp.where(done, old, new),
                                      state, (x, r, p, rr_new))

    x0 = jnp.zeros_like(b)
    state = (x0, b, b, jnp.vdot(b, b))
    return jax.lax.fori_loop(0, iters, body, state)[0]


def newton_cg(loss, w, steps: int, cg_iters: int):
    @jax.jit
    def step(w):
        g = fungrad.grad(loss)(w)
        hvp = lambda v: fungrad.hvp(loss, (w,), (v,))[0]
        return w + conjugate_gradient(hvp, -g, cg_iters)

    history = [float(loss(w))]
    for _ in range(steps):
        w = step(w)
        history.append(float(loss(w)))
    return w, history


def gradient_descent(loss, w, steps: int, lr: float):
    step = jax.jit(lambda w: w - lr * fungrad.grad(loss)(w))
    history = [float(loss(w))]
    for _ in range(steps):
        w = step(w)
        history.append(float(loss(w)))
    return w, history


def largest_eigenvalue(loss, w, iters: int = 50):
    """Power iteration on the Hessian at w, with Hessian-vector products."""
    hvp = jax.jit(lambda v: fungrad.hvp(loss, (w,), (v,))[0])
    v = jnp.ones_like(w) / np.sqrt(w.size)
    for _ in range(iters):
        hv = hvp(v)
        v = hv / jnp.linalg.norm(hv)
    return float(jnp.vdot(v, hvp(v)))


def main(argv: list[str] | None = None) -> tuple[float, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="number of examples")
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--condition", type=float, default=1e4, help="spread of the feature scales")
    parser.add_argument("--newton-steps", type=int, default=15)
    parser.add_argument("--cg-iters", type=int, default=100)
    parser.add_argument("--gd-steps", type=int, default=500)
    args = parser.parse_args(argv)

    jax.config.update("jax_enable_x64", True)  # a badly conditioned problem wants float64
    x, y = make_problem(args.n, args.dim, args.condition)
    loss = make_loss(x, y)
    w0 = jnp.zeros(args.dim)

    lipschitz = largest_eigenvalue(loss, w0)
    print(f"logistic regression, {args.n} examples, {args.dim} features; "
          f"largest Hessian eigenvalue {lipschitz:.3g}, so gradient descent uses step 1/L")
    w_gd, gd = gradient_descent(loss, w0, args.gd_steps, 1.0 / lipschitz)
    w_newton, newton = newton_cg(loss, w0, args.newton_steps, args.cg_iters)
    grad_norm = lambda w: float(jnp.linalg.norm(fungrad.grad(loss)(w)))

    print(f"{'iteration':>10} {'Newton-CG loss':>16} {'gradient descent loss':>22}")
    for i in sorted({0, 1, 2, 3, 5, args.newton_steps, args.gd_steps // 10, args.gd_steps}):
        n_val = f"{newton[i]:.10f}" if i < len(newton) else ""
        g_val = f"{gd[i]:.10f}" if i < len(gd) else ""
        print(f"{i:>10} {n_val:>16} {g_val:>22}")
    print(f"gradient norm after {args.newton_steps} Newton-CG steps: {grad_norm(w_newton):.2e}; "
          f"after {args.gd_steps} gradient-descent steps: {grad_norm(w_gd):.2e}")
    return newton[-1], gd[-1]


if __name__ == "__main__":
    main(sys.argv[1:])
