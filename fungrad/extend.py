"""The rule-author API: registrars, rule tables, symbolic zeros and undefined primals."""

from fungrad._src.rules import (
    UndefinedPrimal,
    defbilinear,
    defjvp,
    defjvp2,
    defjvp_zero,
    deflinear,
    is_undefined,
    jvp_rules,
    partial_eval_rules,
    transpose_rules,
)
from fungrad._src.zeros import Zero, instantiate, is_zero

__all__ = [
    "UndefinedPrimal",
    "Zero",
    "defbilinear",
    "defjvp",
    "defjvp2",
    "defjvp_zero",
    "deflinear",
    "instantiate",
    "is_undefined",
    "is_zero",
    "jvp_rules",
    "partial_eval_rules",
    "transpose_rules",
]
