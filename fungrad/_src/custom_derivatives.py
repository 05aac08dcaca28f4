"""fungrad.custom_jvp / custom_vjp: jax's decorators, honoured by fungrad and by jax."""

from __future__ import annotations

import jax


class custom_jvp(jax.custom_jvp):
    """Gives a function a custom JVP rule, used by fungrad's transforms and by jax's.

    The API is jax's: decorate, then register the rule with ``defjvp`` (one rule for
    all arguments) or ``defjvps`` (one per argument); ``nondiff_argnums`` marks
    arguments that are not differentiated.

    >>> import jax.numpy as jnp, fungrad
    >>> @fungrad.custom_jvp
    ... def f(x):
    ...     return jnp.sin(x)
    >>> @f.defjvp
    ... def f_jvp(primals, tangents):
    ...     (x,), (x_dot,) = primals, tangents
    ...     return f(x), 2.0 * x_dot
    >>> float(fungrad.grad(f)(0.5))
    2.0
    """


class custom_vjp(jax.custom_vjp):
    """Gives a function a custom VJP rule (``defvjp(fwd, bwd)``), used in reverse mode.

    As in jax, forward mode (``jvp``) of a custom_vjp function raises.

    >>> import jax.numpy as jnp, fungrad
    >>> @fungrad.custom_vjp
    ... def clip_gradient(x):
    ...     return x
    >>> clip_gradient.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))
    >>> float(fungrad.grad(lambda x: 5.0 * clip_gradient(x))(2.0))
    1.0
    """
