"""Fast Fourier transforms: fft_p of every type (FFT, IFFT, RFFT, IRFFT), linear in its input.

The transposes follow jax's conventions (jax/_src/lax/fft.py): FFT and IFFT are their
own transposes (the DFT matrix is symmetric); RFFT and IRFFT transpose into each other
with a weight for the Hermitian-redundant bins and jax's conjugations.
"""

from __future__ import annotations

import math

import numpy as np
from jax import lax

from fungrad._src.jaxutil import prims as p
from fungrad._src.rules import deflinear

FftType = lax.FftType


def _fft(x, fft_type, fft_lengths):
    return p.fft_p.bind(x, fft_type=fft_type, fft_lengths=tuple(fft_lengths))


def _half_spectrum_weights(num_bins: int, last_length: int, dtype) -> np.ndarray:
    """1 for the DC bin (and the Nyquist bin when the length is even), 2 for the others:
    how many bins of the full spectrum each bin of an RFFT output stands for."""
    weights = np.full(num_bins, 2.0)
    weights[0] = 1.0
    if last_length % 2 == 0:
        weights[-1] = 1.0
    return weights.astype(dtype)


def _rfft_transpose(ct, fft_lengths):
    weights = _half_spectrum_weights(ct.shape[-1], fft_lengths[-1], ct.dtype)
    weighted = lax.div(lax.conj(ct), lax.broadcast_in_dim(weights, ct.shape, (ct.ndim - 1,)))
    out = _fft(weighted, FftType.IRFFT, fft_lengths)
    return lax.mul(out, lax.full_like(out, math.prod(fft_lengths), shape=()))


def _irfft_transpose(ct, fft_lengths):
    x = _fft(ct, FftType.RFFT, fft_lengths)
    weights = _half_spectrum_weights(x.shape[-1], fft_lengths[-1], x.dtype)
    scale = np.asarray(1 / math.prod(fft_lengths), x.dtype) * weights
    return lax.conj(lax.mul(lax.broadcast_in_dim(scale, x.shape, (x.ndim - 1,)), x))


def _fft_transpose(ct, x, *, fft_type, fft_lengths):
    del x
    if fft_type == FftType.RFFT:
        return [_rfft_transpose(ct, fft_lengths)]
    if fft_type == FftType.IRFFT:
        return [_irfft_transpose(ct, fft_lengths)]
    return [_fft(ct, fft_type, fft_lengths)]


deflinear(p.fft_p, _fft_transpose)  # linear: d fft(x) = fft(dx); FFT^T = FFT, IFFT^T = IFFT
