"""A character-level transformer language model, trained on Python's own standard library.

    python examples/char_transformer.py               # 500 steps (under a minute), then a sample
    python examples/char_transformer.py --steps 2000  # longer, better samples

The text is the source of a few standard-library modules (every Python install has them);
the model is a small decoder-only transformer written with jax.numpy, trained with optax,
with gradients from fungrad.value_and_grad.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import fungrad

MODULES = ("os.py", "functools.py", "textwrap.py", "string.py", "shutil.py")


def load_text(max_chars: int) -> str:
    """Source text of a few standard-library modules, in ASCII."""
    stdlib = os.path.dirname(os.__file__)
    parts = []
    for name in MODULES:
        with open(os.path.join(stdlib, name), encoding="utf-8") as f:
            parts.append(f.read())
    text = "\n".join(parts).encode("ascii", "ignore").decode("ascii")
    return text[:max_chars]


def init_params(key, vocab: int, seq_len: int, d: int, layers: int):
    keys = iter(jax.random.split(key, 4 + 8 * layers))

    def dense(m, n):
        return jax.random.normal(next(keys), (m, n)) / np.sqrt(m)

    def norm():
        return {"scale": jnp.ones(d), "bias": jnp.zeros(d)}

    blocks = [{"ln1": norm(), "q": dense(d, d), "k": dense(d, d), "v": dense(d, d), "out": dense(d, d),
               "ln2": norm(), "up": dense(d, 4 * d), "down": dense(4 * d, d)}
              for _ in range(layers)]
    return {"embed": 0.1 * jax.random.normal(next(keys), (vocab, d)),
            "position": 0.1 * jax.random.normal(next(keys), (seq_len, d)),
            "blocks": blocks, "ln_f": norm(), "unembed": dense(d, vocab)}


def layer_norm(x, p):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def attention(x, block, heads: int):
    t, d = x.shape
    q, k, v = ((x @ block[name]).reshape(t, heads, d // heads).transpose(1, 0, 2)
               for name in ("q", "k", "v"))
    scores = q @ k.transpose(0, 2, 1) / np.sqrt(d // heads)
    causal = jnp.tril(jnp.ones((t, t), bool))
    weights = jax.nn.softmax(jnp.where(causal, scores, -1e9), axis=-1)
    return (weights @ v).transpose(1, 0, 2).reshape(t, d) @ block["out"]


def forward(params, tokens, heads: int):
    """Logits for the next character at every position of one sequence."""
    x = params["embed"][tokens] + params["position"][: tokens.shape[0]]
    for block in params["blocks"]:
        x = x + attention(layer_norm(x, block["ln1"]), block, heads)
        x = x + jax.nn.gelu(layer_norm(x, block["ln2"]) @ block["up"]) @ block["down"]
    return layer_norm(x, params["ln_f"]) @ params["unembed"]


def loss_fn(params, batch, heads: int):
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits = jax.vmap(lambda t: forward(params, t, heads))(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def sample(params, prompt, length: int, seq_len: int, heads: int, key, temperature: float = 0.8):
    """Extend `prompt` (token ids) by `length` characters, one at a time."""
    @jax.jit
    def next_token(params, window, last, key):
        # The window is padded on the right to a fixed length (one compilation); causal
        # attention means the padding does not change the logits at position `last`.
        logits = forward(params, window, heads)[last]
        return jax.random.categorical(key, logits / temperature)

    tokens = list(prompt)
    for _ in range(length):
        window = tokens[-seq_len:]
        padded = jnp.asarray(window + [0] * (seq_len - len(window)))
        key, sub = jax.random.split(key)
        tokens.append(int(next_token(params, padded, len(window) - 1, sub)))
    return tokens


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--max-chars", type=int, default=200_000)
    parser.add_argument("--sample-len", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    text = load_text(args.max_chars)
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = np.array([index[c] for c in text], dtype=np.int32)
    print(f"{len(text):,} characters of standard-library source, {len(chars)} distinct")

    heads = args.heads
    params = init_params(jax.random.key(args.seed), len(chars), args.seq_len, args.d_model,
                         args.layers)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(optax.cosine_decay_schedule(args.lr, max(args.steps, 1))))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, batch):
        loss, grads = fungrad.value_and_grad(loss_fn)(params, batch, heads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    width = args.seq_len + 1
    start, loss = time.perf_counter(), float("nan")
    for step in range(1, args.steps + 1):
        starts = rng.integers(0, len(data) - width, args.batch_size)
        batch = np.stack([data[s:s + width] for s in starts])
        params, opt_state, loss = train_step(params, opt_state, batch)
        loss = float(loss)
        if step == 1 or step % 50 == 0 or step == args.steps:
            print(f"step {step:>5}  loss {loss:.3f}  ({time.perf_counter() - start:.1f} s)")

    prompt = [index[c] for c in "def "]
    tokens = sample(params, prompt, args.sample_len, args.seq_len, heads, jax.random.key(args.seed))
    print("sample:\n" + "".join(chars[t] for t in tokens))
    return loss


if __name__ == "__main__":
    main(sys.argv[1:])
