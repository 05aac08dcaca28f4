"""Rule families; importing this package registers every rule."""

from fungrad._src.primitives import (  # noqa: F401
    arithmetic,
    collectives,
    control_flow,
    convolution,
    fft,
    higher_order,
    indexing,
    linalg,
    plumbing,
    reductions,
    special,
    state,
    structural,
    windows,
)
