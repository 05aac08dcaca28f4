"""Rule families; importing this package registers every rule."""

from fungrad._src.primitives import (  # noqa: F401
    arithmetic,
    collectives,
    control_flow,
    convolution,
    effects,
    fft,
    higher_order,
    indexing,
    linalg,
    plumbing,
    ragged,
    reductions,
    special,
    state,
    structural,
    windows,
)
