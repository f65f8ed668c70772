"""Rotary position embeddings in Hugging Face's layout, with Llama 3 frequency scaling.

Each head's ``head_dim`` is two halves: pair ``(x[i], x[i + D/2])`` is rotated by angle
``position * inv_freq[i]``. Llama 3 (``RopeScaling``) divides the low frequencies (wavelengths
longer than ``original_max_position_embeddings / low_freq_factor``) by ``factor``, keeps the
high ones (wavelengths shorter than ``original / high_freq_factor``), and blends in between.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> np.ndarray:
    """f64[head_dim / 2]: the rotation speed of each pair (radians per position)."""
    exponents = np.arange(0, config.head_dim, 2, dtype=np.float64) / config.head_dim
    inv_freq = config.rope_theta ** -exponents
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    wavelength = 2 * np.pi / inv_freq
    original = scaling.original_max_position_embeddings
    low_freq_wavelength = original / scaling.low_freq_factor
    high_freq_wavelength = original / scaling.high_freq_factor
    scaled = np.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
    smooth = (original / wavelength - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    between = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
    return np.where(between, blended, scaled)


def rotate(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate ``x: [T, heads, head_dim]`` by the positions ``i32[T]`` of its tokens."""
    angles = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
