"""Spec table for fft_p (FFT, IFFT, RFFT, IRFFT over 1 to 3 axes) and the jnp.fft functions."""

import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from tests.harness import check_case

FFT, IFFT, RFFT, IRFFT = (lax.FftType.FFT, lax.FftType.IFFT, lax.FftType.RFFT,
                          lax.FftType.IRFFT)
LIGHT = {"order": 1}


def _fft(fft_type, lengths):
    return lambda x: lax.fft(x, fft_type, lengths)


def _irfft_input(shape):
    """A complex spectrum for IRFFT; any input, not only a Hermitian one, is fair game."""
    return ("c", shape)


# (id, function, argument specs[, check_all options]): ("r", shape) is a random real array,
# ("c", shape) a random complex one, of the test's precision.
CASES = [
    # lax.fft_p, every type, 1 to 3 axes, even and odd lengths (the Nyquist bin of RFFT).
    ("FFT/1d_even", _fft(FFT, (4,)), [("c", (3, 4))]),
    ("FFT/1d_odd", _fft(FFT, (5,)), [("c", (5,))]),
    ("FFT/2d", _fft(FFT, (3, 4)), [("c", (2, 3, 4))]),
    ("FFT/3d_size1", _fft(FFT, (2, 1, 3)), [("c", (2, 1, 3))], LIGHT),
    ("IFFT/1d_odd", _fft(IFFT, (5,)), [("c", (2, 5))]),
    ("IFFT/2d_even", _fft(IFFT, (4, 2)), [("c", (4, 2))]),
    ("IFFT/3d", _fft(IFFT, (2, 3, 3)), [("c", (2, 3, 3))], LIGHT),
    ("RFFT/1d_even", _fft(RFFT, (6,)), [("r", (2, 6))]),
    ("RFFT/1d_odd", _fft(RFFT, (5,)), [("r", (5,))]),
    ("RFFT/1d_len1", _fft(RFFT, (1,)), [("r", (3, 1))]),
    ("RFFT/1d_len2", _fft(RFFT, (2,)), [("r", (2,))]),
    ("RFFT/2d_odd", _fft(RFFT, (3, 5)), [("r", (2, 3, 5))]),
    ("RFFT/3d_even", _fft(RFFT, (2, 3, 4)), [("r", (2, 3, 4))], LIGHT),
    ("IRFFT/1d_even", _fft(IRFFT, (6,)), [_irfft_input((2, 4))]),
    ("IRFFT/1d_odd", _fft(IRFFT, (5,)), [_irfft_input((3,))]),
    ("IRFFT/1d_len1", _fft(IRFFT, (1,)), [_irfft_input((1,))]),
    ("IRFFT/2d_even", _fft(IRFFT, (3, 4)), [_irfft_input((2, 3, 3))]),
    ("IRFFT/3d_odd", _fft(IRFFT, (2, 2, 5)), [_irfft_input((2, 2, 3))], LIGHT),
    # Nonlinear around the transform, so that second order is not trivially zero.
    ("RFFT/then_abs2", lambda x: jnp.abs(jnp.fft.rfft(x)) ** 2, [("r", (7,))]),
    ("IRFFT/of_square", lambda z: jnp.fft.irfft(z * z, n=4), [("c", (3,))]),
    # jnp.fft: each function, with its own padding, cropping and normalisation.
    ("jnp/fft", lambda z: jnp.fft.fft(z, axis=0), [("c", (4, 3))]),
    ("jnp/fft_real_input", lambda x: jnp.fft.fft(x, n=6), [("r", (5,))]),
    ("jnp/ifft_ortho", lambda z: jnp.fft.ifft(z, norm="ortho"), [("c", (5,))]),
    ("jnp/rfft_padded", lambda x: jnp.fft.rfft(x, n=8), [("r", (2, 5))]),
    ("jnp/irfft_odd_n", lambda z: jnp.fft.irfft(z, n=7), [("c", (4,))]),
    ("jnp/irfft_default_n", lambda z: jnp.fft.irfft(z, axis=0), [("c", (3, 2))]),
    ("jnp/fft2", lambda z: jnp.fft.fft2(z), [("c", (3, 4))]),
    ("jnp/fftn", lambda z: jnp.fft.fftn(z, norm="forward"), [("c", (2, 3, 2))], LIGHT),
    ("jnp/ifftn", lambda z: jnp.fft.ifftn(z, axes=(0, 2)), [("c", (2, 3, 2))], LIGHT),
    ("jnp/rfftn", lambda x: jnp.fft.rfftn(x), [("r", (2, 3, 4))], LIGHT),
    ("jnp/rfft2", lambda x: jnp.fft.rfft2(x, s=(3, 3)), [("r", (4, 2))]),
    ("jnp/irfftn", lambda z: jnp.fft.irfftn(z, s=(2, 3, 5)), [("c", (2, 3, 3))], LIGHT),
    ("jnp/irfft2", lambda z: jnp.fft.irfft2(z), [("c", (3, 3))]),
    ("jnp/hfft", lambda z: jnp.fft.hfft(z, n=6), [("c", (4,))]),
    ("jnp/hfft_odd", lambda z: jnp.fft.hfft(z), [("c", (2, 3))]),
    ("jnp/ihfft", lambda x: jnp.fft.ihfft(x), [("r", (5,))]),
    ("jnp/ihfft_even", lambda x: jnp.fft.ihfft(x, axis=0), [("r", (4, 2))]),
]

DTYPES = {"single": {"r": np.float32, "c": np.complex64},
          "double": {"r": np.float64, "c": np.complex128}}


def _args(specs, precision, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for kind, shape in specs:
        val = rng.standard_normal(shape)
        if kind == "c":
            val = val + 1j * rng.standard_normal(shape)
        out.append(val.astype(DTYPES[precision][kind]))
    return out


@pytest.mark.parametrize("precision", ["single", "double"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_rule(case, precision):
    check_case(case, _args(case[2], precision), light=precision == "single")
