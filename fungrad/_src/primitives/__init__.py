"""Rule families; importing this package registers every rule."""

from fungrad._src.primitives import arithmetic, higher_order, structural  # noqa: F401
