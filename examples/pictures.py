"""The first lessons of calculus as pictures, with every derivative taken by fungrad.

    python examples/pictures.py pictures/      # writes three PNG files into pictures/

- tangents.png: a function with tangent lines whose slopes are fungrad.grad's.
- descent.png:  gradient descent on a 2-D loss surface (contours and the path taken).
- taylor.png:   first- and second-order Taylor approximations around a point, from
                fungrad.jvp (slope) and fungrad.hvp (curvature).

Needs matplotlib (`pip install -e '.[plots]'`).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only, no window
import matplotlib.pyplot as plt  # noqa: E402

import fungrad  # noqa: E402


def f(x):
    return 3 * x**2 - 4 * x + 5 + jnp.sin(3 * x)


def plot_tangents(path: str, points: int) -> None:
    xs = jnp.linspace(-1.5, 2.5, points)
    slope = jax.vmap(fungrad.grad(f))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, f(xs), color="black", label="f(x) = 3x² - 4x + 5 + sin 3x")
    for x0, s0 in zip(jnp.linspace(-1.0, 2.0, 5), slope(jnp.linspace(-1.0, 2.0, 5)), strict=True):
        near = jnp.linspace(x0 - 0.5, x0 + 0.5, 2)
        ax.plot(near, f(x0) + s0 * (near - x0), linewidth=2,
                label=f"slope {float(s0):+.2f} at {float(x0):.2f}")
        ax.plot([x0], [f(x0)], "o", color="black", markersize=4)
    ax.set(xlabel="x", ylabel="f(x)", title="tangent lines from fungrad.grad")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def loss_2d(p):
    x, y = p[0], p[1]
    return (1 - x) ** 2 + 5 * (y - x**2) ** 2  # a gentle Rosenbrock valley


def plot_descent(path: str, points: int, steps: int, lr: float = 0.015) -> None:
    step = jax.jit(lambda p: p - lr * fungrad.grad(loss_2d)(p))
    p, path_points = jnp.array([-1.5, 2.0]), []
    for _ in range(steps):
        path_points.append(p)
        p = step(p)
    path_points.append(p)
    trail = jnp.stack(path_points)

    xs, ys = jnp.meshgrid(jnp.linspace(-2, 2, points), jnp.linspace(-1, 3, points))
    zs = jax.vmap(jax.vmap(lambda x, y: loss_2d(jnp.stack([x, y]))))(xs, ys)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.contour(xs, ys, jnp.log1p(zs), levels=20, cmap="viridis")
    ax.plot(trail[:, 0], trail[:, 1], ".-", color="crimson", markersize=3,
            label=f"{steps} steps of gradient descent")
    ax.plot([1.0], [1.0], "*", color="black", markersize=12, label="minimum (1, 1)")
    ax.set(xlabel="x", ylabel="y", title="(1 - x)² + 5 (y - x²)²")
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def g(x):
    return jnp.exp(-0.5 * x) * jnp.cos(2 * x)


def plot_taylor(path: str, points: int, x0: float = 0.8) -> None:
    x0 = jnp.asarray(x0)
    value, slope = fungrad.jvp(g, (x0,), (jnp.ones_like(x0),))
    (curvature,) = fungrad.hvp(g, (x0,), (jnp.ones_like(x0),))
    xs = jnp.linspace(-1.0, 3.0, points)
    first = value + slope * (xs - x0)
    second = first + 0.5 * curvature * (xs - x0) ** 2

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, g(xs), color="black", label="g(x) = exp(-x/2) cos 2x")
    ax.plot(xs, first, "--", label="first order: g + g'·(x - x₀)")
    ax.plot(xs, second, ":", linewidth=2, label="second order: ... + g''·(x - x₀)²/2")
    ax.plot([x0], [value], "o", color="black")
    ax.set(xlabel="x", ylim=(-2.0, 2.0), title=f"Taylor approximations around x₀ = {float(x0):g}")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", nargs="?", default="pictures", help="where to write the PNGs")
    parser.add_argument("--points", type=int, default=200, help="samples per axis of each plot")
    parser.add_argument("--steps", type=int, default=400, help="gradient-descent steps")
    args = parser.parse_args(argv)

    os.makedirs(args.outdir, exist_ok=True)
    paths = [os.path.join(args.outdir, name) for name in ("tangents.png", "descent.png", "taylor.png")]
    plot_tangents(paths[0], args.points)
    plot_descent(paths[1], args.points, args.steps)
    plot_taylor(paths[2], args.points)
    for p in paths:
        print("wrote", p)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
