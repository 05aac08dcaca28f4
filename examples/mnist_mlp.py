"""Train an MLP on scikit-learn's handwritten digits (8x8 images, no download) with optax.

    python examples/mnist_mlp.py              # about 97% test accuracy in a few seconds
    python examples/mnist_mlp.py --epochs 2   # quicker

The gradients come from fungrad.value_and_grad; everything else is ordinary jax + optax.
Needs scikit-learn (`pip install -e '.[examples]'`).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import fungrad


def load_data(seed: int = 0, test_fraction: float = 0.25):
    """The 1797 digits as float32 pixels in [0, 1], shuffled and split into train and test."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n_test = int(len(x) * test_fraction)
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def init_mlp(key, sizes):
    """He-initialized dense layers: a list of {"w", "b"} dicts."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m), "b": jnp.zeros(n)}
            for k, m, n in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def predict(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def loss_fn(params, x, y):
    logits = predict(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(predict(params, x), axis=-1) == y))


def progress_bar(done: int, total: int, loss: float, width: int = 30) -> None:
    filled = int(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    end = "\n" if done == total else ""
    print(f"\r  [{bar}] {done:>4}/{total}  loss {loss:.4f}", end=end, flush=True)


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--hidden", type=int, default=128, help="width of the two hidden layers")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    (x_train, y_train), (x_test, y_test) = load_data(args.seed)
    print(f"digits: {len(x_train)} training and {len(x_test)} test images of 8x8 pixels")
    params = init_mlp(jax.random.key(args.seed), [64, args.hidden, args.hidden, 10])
    optimizer = optax.adam(args.lr)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = fungrad.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    batches = len(x_train) // args.batch_size
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        print(f"epoch {epoch}/{args.epochs}")
        order = rng.permutation(len(x_train))
        for b in range(batches):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            params, opt_state, loss = train_step(params, opt_state, x_train[idx], y_train[idx])
            if (b + 1) % 5 == 0 or b + 1 == batches:
                progress_bar(b + 1, batches, float(loss))
        print(f"  train accuracy {accuracy(params, x_train, y_train):.3f}   "
              f"test accuracy {accuracy(params, x_test, y_test):.3f}")
    test_acc = accuracy(params, x_test, y_test)
    print(f"final test accuracy: {test_acc:.3f} ({time.perf_counter() - start:.1f} s)")
    return test_acc


if __name__ == "__main__":
    main(sys.argv[1:])
