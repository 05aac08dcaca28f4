"""Private implementation of fungrad."""
