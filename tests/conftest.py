"""Test configuration: float64 available everywhere (float32 arrays stay float32)."""

import jax

jax.config.update("jax_enable_x64", True)
