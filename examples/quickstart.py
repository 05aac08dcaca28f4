"""fungrad in five minutes: derivatives you know, each printed beside jax's own answer."""

import jax
import jax.numpy as jnp

import fungrad


def show(label, ours, theirs):
    print(f"{label:<44} fungrad: {ours}   jax: {theirs}")


def main():
    # 1. f(x) = 3x^2 - 4x + 5: the slope at x = 3 is 6x - 4 = 14.
    def f(x):
        return 3 * x**2 - 4 * x + 5

    h = 0.001
    show("f'(3) for f(x) = 3x^2 - 4x + 5", float(fungrad.grad(f)(3.0)), float(jax.grad(f)(3.0)))
    print(f"{'  forward difference with h = 0.001':<44} {(f(3.0 + h) - f(3.0)) / h:.3f}")

    # 2. d = a*b + c: the partials are (b, a, 1).
    def d(a, b, c):
        return a * b + c

    args = (2.0, -3.0, 10.0)
    ours = [float(g) for g in fungrad.grad(d, argnums=(0, 1, 2))(*args)]
    theirs = [float(g) for g in jax.grad(d, argnums=(0, 1, 2))(*args)]
    show("partials of d = ab + c at (2, -3, 10)", ours, theirs)

    # 3. The gradient of x^2 + y^2 is [2x, 2y].
    def bowl(p):
        return jnp.sum(p**2)

    p = jnp.array([1.0, -2.0])
    show("gradient of x^2 + y^2 at (1, -2)", fungrad.grad(bowl)(p).tolist(), jax.grad(bowl)(p).tolist())

    # 4. The chain rule through a small network.
    key_w, key_x = jax.random.split(jax.random.key(0))
    params = {"w": jax.random.normal(key_w, (3, 2)), "b": jnp.zeros(2)}
    x = jax.random.normal(key_x, (4, 3))

    def net_loss(params):
        hidden = jnp.tanh(x @ params["w"] + params["b"])
        return jnp.mean(hidden**2)

    ours, theirs = fungrad.grad(net_loss)(params), jax.grad(net_loss)(params)
    show("d loss / d b of a one-layer tanh network", ours["b"].round(5).tolist(),
         theirs["b"].round(5).tolist())

    # 5. Gradient descent lowers a loss.
    target = jnp.array([3.0, -1.0])

    def loss(q):
        return jnp.sum((q - target) ** 2)

    q = jnp.zeros(2)
    step = jax.jit(lambda q: q - 0.1 * fungrad.grad(loss)(q))
    print("gradient descent on |q - (3, -1)|^2:")
    for i in range(31):
        if i % 10 == 0:
            print(f"  step {i:>2}: loss {float(loss(q)):.6f}  q = {q.round(4).tolist()}")
        q = step(q)


if __name__ == "__main__":
    main()
