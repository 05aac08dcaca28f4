"""fungrad: automatic differentiation of pure JAX functions with its own engine."""

from fungrad._src.api import (
    grad,
    hessian,
    hvp,
    jacfwd,
    jacrev,
    jvp,
    linearize,
    value_and_grad,
    vjp,
)
from fungrad._src.caching import clear_caches
from fungrad._src.custom_derivatives import custom_jvp, custom_vjp
from fungrad._src.loops import while_snapshots

__version__ = "0.1.0"

__all__ = [
    "clear_caches",
    "custom_jvp",
    "custom_vjp",
    "grad",
    "hessian",
    "hvp",
    "jacfwd",
    "jacrev",
    "jvp",
    "linearize",
    "value_and_grad",
    "vjp",
    "while_snapshots",
]
