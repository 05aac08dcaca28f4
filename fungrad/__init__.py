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
from fungrad._src.jet import jet
from fungrad._src.loops import while_snapshots
from fungrad._src.sparsity import hessian_sparsity, jacobian_sparsity
from fungrad._src.structured import (
    hessian_diag,
    hutchinson_trace,
    jacobian,
    sparse_hessian,
    sparse_jacobian,
    value_and_hessian,
    value_and_jacobian,
    value_and_sparse_hessian,
    value_and_sparse_jacobian,
    vhp,
)

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
    "hessian_diag",
    "hessian_sparsity",
    "hutchinson_trace",
    "hvp",
    "jacfwd",
    "jacobian",
    "jacobian_sparsity",
    "jacrev",
    "jet",
    "jvp",
    "linearize",
    "sparse_hessian",
    "sparse_jacobian",
    "value_and_grad",
    "value_and_hessian",
    "value_and_jacobian",
    "value_and_sparse_hessian",
    "value_and_sparse_jacobian",
    "vhp",
    "vjp",
    "while_snapshots",
]
