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
from fungrad._src.debug_nans import NonFiniteDerivativeError, debug_nans
from fungrad._src.explain import explain
from fungrad._src.loops import while_snapshots

__version__ = "0.1.0"

__all__ = [
    "NonFiniteDerivativeError",
    "clear_caches",
    "custom_jvp",
    "custom_vjp",
    "debug_nans",
    "explain",
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
