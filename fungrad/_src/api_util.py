"""Argument handling for the public transforms: argnums, pytrees, and every input check."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import tree_util

from fungrad._src import jaxutil
from fungrad._src.jaxutil import float0
from fungrad._src.zeros import is_inexact


def check_callable(fun: Any, fname: str) -> None:
    """Rejects a non-callable `fun` when the transform is made, as jax does."""
    if not callable(fun):
        raise TypeError(f"{fname}: expected a callable value as the function to "
                        f"differentiate, got {fun!r} of type {type(fun).__name__}.")


def argnums_tuple(argnums: int | Sequence[int], nargs: int, fname: str) -> tuple[int, ...]:
    """`argnums` as a tuple of non-negative indices, checked against `nargs`."""
    nums: tuple[int, ...]
    if isinstance(argnums, (int, np.integer)):
        nums = (int(argnums),)
    elif isinstance(argnums, (tuple, list)) and all(isinstance(i, (int, np.integer)) for i in argnums):
        nums = tuple(int(i) for i in argnums)
    else:
        raise TypeError(f"{fname}: argnums must be an int or a tuple of ints, got {argnums!r}.")
    for i in nums:
        if not -nargs <= i < nargs:
            raise ValueError(
                f"{fname}: argnums={argnums!r} is out of bounds for a function called with "
                f"{nargs} positional argument{'s' if nargs != 1 else ''}; each index must be "
                f"in [{-nargs}, {nargs}). Pass the arguments to differentiate positionally.")
    return tuple(i % nargs for i in nums)


def is_array_like(x: Any) -> bool:
    try:
        jaxutil.typeof(x)
    except TypeError:
        return False
    return True


def check_array_leaves(tree: Any, what: str, fname: str) -> None:
    """Every leaf of `tree` must be an array or a scalar that jax can trace."""
    if all(map(is_array_like, tree_util.tree_leaves(tree))):
        return
    for path, leaf in tree_util.tree_flatten_with_path(tree)[0]:
        if not is_array_like(leaf):
            where = f"{what}{tree_util.keystr(path)}"
            fix = ("pass other values through arguments outside argnums, or close over them"
                   if what.startswith("args") else
                   "close over other values instead (for example with functools.partial)")
            raise TypeError(
                f"{fname}: {where} is of type {type(leaf).__name__}, which is not a valid JAX "
                f"type: the differentiated arguments must be arrays or numeric scalars (or "
                f"pytrees of them); {fix}.")


def check_diff_args(args: Sequence[Any], nums: Sequence[int], fname: str) -> None:
    """`check_array_leaves` on each differentiated positional argument, named by position."""
    for i in nums:
        check_array_leaves(args[i], f"args[{i}]", fname)


def dtype_name(dtype: Any) -> str:
    """`dtype`'s name as users write it (numpy calls float0 'void')."""
    return "float0" if dtype == float0 else np.dtype(dtype).name


def check_input_dtype(x: Any, *, holomorphic: bool, allow_int: bool, fname: str) -> None:
    dtype = jaxutil.typeof(x).dtype
    if not holomorphic and is_inexact(dtype):
        return  # the common case, in one check
    if holomorphic:
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"{fname} with holomorphic=True requires inputs with complex dtype, "
                            f"but got {dtype_name(dtype)}. Pass complex inputs (for example "
                            f"x.astype(jnp.complex64)), or drop holomorphic=True.")
    elif (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.bool_)
          or dtype == float0):
        if not allow_int:
            raise TypeError(
                f"{fname} requires real- or complex-valued inputs (input dtype that is a "
                f"sub-dtype of np.inexact), but got {dtype_name(dtype)}. If you want to use "
                f"Boolean- or integer-valued inputs, use fungrad.vjp or set allow_int to True "
                f"(their gradient is then float0 zeros); to differentiate, pass floats "
                f"(for example x.astype(jnp.float32)).")
    elif not jnp.issubdtype(dtype, jnp.inexact):
        raise TypeError(f"{fname} requires numerical-valued inputs (input dtype that is a "
                        f"sub-dtype of np.bool_ or np.number), but got {dtype_name(dtype)}.")


def check_jacfwd_input_dtype(x: Any, *, holomorphic: bool, fname: str) -> None:
    """Forward-mode Jacobians need real floating inputs (complex ones with holomorphic)."""
    if holomorphic:
        check_input_dtype(x, holomorphic=True, allow_int=False, fname=fname)
        return
    dtype = jaxutil.typeof(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fname} requires real-valued inputs (input dtype that is a sub-dtype of "
            f"np.floating), but got {dtype_name(dtype)}. For holomorphic differentiation, pass "
            f"holomorphic=True. For differentiation of non-holomorphic functions involving "
            f"complex inputs or integer inputs, use fungrad.jvp directly.")


def forward_argnums(argnums: int | Sequence[int], args: Sequence[Any], fname: str,
                    holomorphic: bool = False) -> tuple[int, ...]:
    """The differentiated positions of a forward-mode Jacobian, each argument checked:
    arrays of real floats (complex with `holomorphic`)."""
    nums = argnums_tuple(argnums, len(args), fname)
    check_diff_args(args, nums, fname)
    for x in tree_util.tree_leaves(tuple(args[i] for i in nums)):
        check_jacfwd_input_dtype(x, holomorphic=holomorphic, fname=fname)
    return nums


def check_scalar_output(aval: Any, *, holomorphic: bool, fname: str) -> None:
    """The output type `aval` of a function to take the gradient of."""
    if aval.shape != ():
        raise TypeError(f"{fname} is only defined for scalar-output functions, but the "
                        f"output had shape {aval.shape}. Use fungrad.vjp or fungrad.jacrev "
                        f"for functions with array outputs.")
    check_output_dtype(aval.dtype, holomorphic=holomorphic, fname=fname)


def check_output_dtype(dtype: Any, *, holomorphic: bool, fname: str) -> None:
    if holomorphic:
        if not jnp.issubdtype(dtype, jnp.complexfloating):
            raise TypeError(f"{fname} with holomorphic=True requires outputs with complex "
                            f"dtype, but got {dtype_name(dtype)}. A function of complex inputs "
                            f"with real outputs is not holomorphic: drop holomorphic=True and "
                            f"differentiate with respect to real inputs, or use fungrad.vjp.")
    elif jnp.issubdtype(dtype, jnp.complexfloating):
        raise TypeError(
            f"{fname} requires real-valued outputs (output dtype that is a sub-dtype of "
            f"np.floating), but got {dtype_name(dtype)}. For holomorphic differentiation, pass "
            f"holomorphic=True. For differentiation of non-holomorphic functions involving "
            f"complex outputs, use fungrad.vjp directly.")
    elif not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"{fname} requires real-valued outputs (output dtype that is a sub-dtype of "
            f"np.floating), but got {dtype_name(dtype)}. Integer and Boolean outputs have no "
            f"gradient: return a float (for example y.astype(jnp.float32)), or use fungrad.vjp "
            f"directly for functions with integer outputs.")


def leaf_name(prefix: str, path: tuple, sep: str = "") -> Callable[[], str]:
    """The name of the leaf at `path` for a message, made only when a message needs it."""
    return lambda: prefix + (sep + tree_util.keystr(path) if path else "")


def check_tangent(primal: Any, tangent: Any, what: str | Callable[[], str], fname: str,
                  primal_what: str = "the corresponding primal") -> None:
    """A tangent (or cotangent) must have the primal's shape and tangent dtype.

    `what` names the tangent in the message (or makes its name: a path, formatted only
    for a message); `primal_what` names the value that `tangent` belongs to.
    """
    p_aval = jaxutil.typeof(primal)
    try:
        t_aval = jaxutil.typeof(tangent)
    except TypeError:
        what = what() if callable(what) else what
        raise TypeError(f"{fname}: {what} of type {type(tangent).__name__} is not a valid "
                        f"JAX type; expected an array of shape {p_aval.shape} and dtype "
                        f"{dtype_name(p_aval.to_tangent_aval().dtype)}.") from None
    expected = p_aval.to_tangent_aval().dtype
    if t_aval.shape == p_aval.shape and (t_aval.dtype == expected or (
            fname == "vjp_fun" and expected == float0 and t_aval.dtype == p_aval.dtype)):
        return  # the common case
    what = what() if callable(what) else what
    if t_aval.shape != p_aval.shape:
        raise ValueError(f"{fname}: {what} has shape {t_aval.shape}, but {primal_what} has "
                         f"shape {p_aval.shape}; they must be equal.")
    if expected == float0 and fname == "vjp_fun" and t_aval.dtype == p_aval.dtype:
        return  # as in jax, an integer output's cotangent may be given in its own dtype
    if t_aval.dtype != expected and not (t_aval.weak_type and _same_kind(t_aval.dtype, expected)):
        hint = (" (integer and boolean values take float0 tangents: "
                "np.zeros(shape, dtype=jax.dtypes.float0))" if expected == float0
                else f" (cast it with .astype(jnp.{dtype_name(expected)}))")
        raise TypeError(f"{fname}: {what} has dtype {dtype_name(t_aval.dtype)}, but {primal_what} "
                        f"has dtype {dtype_name(p_aval.dtype)}, so the expected dtype is "
                        f"{dtype_name(expected)}{hint}.")


def _same_kind(a: Any, b: Any) -> bool:
    return b != float0 and jnp.issubdtype(a, jnp.inexact) and jnp.issubdtype(b, jnp.inexact)


def check_same_structure(tree_a: Any, tree_b: Any, what_a: str, what_b: str, fname: str) -> None:
    if tree_a != tree_b:
        raise TypeError(f"{fname}: {what_a} and {what_b} must have the same tree structure, "
                        f"but {what_a} is {tree_a} and {what_b} is {tree_b}.")


def check_args_tuple(value: Any, name: str, fname: str) -> None:
    """`value` must be a tuple or list holding one entry per positional argument of fun."""
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"{fname}: {name} must be a tuple or a list with one entry per "
                        f"positional argument of fun, got {type(value).__name__}. Wrap a "
                        f"single argument as ({name[:-1]},).")


def split_aux(out: Any, fname: str) -> tuple[Any, Any]:
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        if isinstance(out, (tuple, list)):
            got = f"a {type(out).__name__} of length {len(out)}"
        elif is_array_like(out):
            got = f"a single array of shape {jaxutil.typeof(out).shape}"
        else:
            got = f"a value of type {type(out).__name__}"
        raise TypeError(f"{fname} with has_aux=True requires the function to return a pair "
                        f"(output, aux), but it returned {got}. Return (output, aux), or "
                        f"pass has_aux=False.")
    return out[0], out[1]


def std_basis(leaves: Sequence[Any]) -> list[Any]:
    """Rows of the identity for the concatenated flat `leaves`, split back per leaf.

    Each result has shape (N, *leaf.shape), N the total size, in the leaf's tangent dtype.
    """
    sizes = [int(np.prod(np.shape(x))) for x in leaves]
    total = sum(sizes)
    out: list[Any] = []
    start = 0
    for x, size in zip(leaves, sizes, strict=True):
        aval = jaxutil.typeof(x)
        dtype = aval.to_tangent_aval().dtype
        if dtype == float0:
            out.append(np.zeros((total, *aval.shape), float0))
        else:
            eye = jnp.eye(total, size, -start, dtype=dtype)
            out.append(eye.reshape((total, *aval.shape)))
        start += size
    return out


def tangent_dtype_of(x: Any) -> Any:
    return jaxutil.typeof(x).to_tangent_aval().dtype


def as_array(x: Any) -> Any:
    return x if isinstance(x, (jax.Array, np.ndarray)) or jaxutil.is_tracer(x) else jnp.asarray(x)


def check_chunk_size(chunk_size: Any, fname: str) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer))
                                   or isinstance(chunk_size, bool) or chunk_size < 1):
        raise ValueError(f"{fname}: chunk_size must be a positive integer or None (all at "
                         f"once), got {chunk_size!r}.")


def check_memory_budget(memory_budget: Any, chunk_size: Any, fname: str) -> None:
    """`memory_budget` is a positive whole number of bytes, or None; not with chunk_size."""
    if memory_budget is None:
        return
    if (not isinstance(memory_budget, (int, np.integer)) or isinstance(memory_budget, bool)
            or memory_budget < 1):
        raise ValueError(f"{fname}: memory_budget must be a positive integer number of bytes "
                         f"or None (no budget), got {memory_budget!r}. For example "
                         f"memory_budget=256 * 2**20 for 256 MiB.")
    if chunk_size is not None:
        raise ValueError(f"{fname}: pass chunk_size or memory_budget, not both (got "
                         f"chunk_size={chunk_size!r} and memory_budget={memory_budget!r}): "
                         f"memory_budget picks the chunk size itself.")
