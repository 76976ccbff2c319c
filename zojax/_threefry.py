"""Threefry-2x32 from jnp ops (private): ``jax.random``'s bits for any counters.

With ``jax_threefry_partitionable`` (JAX's default), entry ``e`` of ``jax.random.bits(key,
shape)`` is the hash of the counter ``e`` (its flat index) under the key, so the draw of any
entries, e.g. some rows of a leaf, is computed without the others: the same bits as the whole
draw, bit for bit. :mod:`zojax._cpu` builds its fused sampler on :func:`bits`; the
low-memory mode (:mod:`zojax.low_memory`) draws the rows of an embedding table that a batch
reads with :func:`normal_rows` / :func:`rademacher_rows`.

The *fast* stream (``stream="fast"`` of :mod:`zojax.directions`; not ``jax.random``'s numbers)
is built here too, from the same hash: :func:`fast_normal` keeps both 32-bit words of each hash
(``jax.random`` XORs them into one) and turns their 64 bits into a standardized binomial,
(number of ones − 32) / 4, with a population count in place of erf⁻¹;
:func:`packed_rademacher` takes 64 signs from each hash, whose words are computed once per draw
(1/32 of the leaf's float32 bytes) and kept apart from the expansion by an optimization
barrier, so XLA does not compute the hash again for each of the 64 entries.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x1, x2):
    """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as in jax.random, unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for block in range(5):
        for rotation in _ROTATIONS[block % 2]:
            x1 = x1 + x2
            x2 = x1 ^ ((x2 << np.uint32(rotation)) | (x2 >> np.uint32(32 - rotation)))
        x1 = x1 + ks[(block + 1) % 3]
        x2 = x2 + ks[(block + 2) % 3] + np.uint32(block + 1)
    return x1, x2


def reproducible(key, size: int) -> bool:
    """Whether the bits of ``size`` entries under ``key`` are computed here as jax.random does."""
    return (jax.config.jax_threefry_partitionable and 0 < size < 2**32
            and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            and str(jax.random.key_impl(key)) == "threefry2x32")


def counter_bits(key, counters, rng_bits: int):
    """``jax.random.bits``-equal unsigned bits of width ``rng_bits`` (8/16/32) at the flat
    indices ``counters`` (uint32, any shape) of a draw of at most 2³² entries."""
    k1, k2 = jax.random.key_data(key)
    bits1, bits2 = _threefry2x32(k1, k2, jnp.zeros(counters.shape, np.uint32), counters)
    bits = bits1 ^ bits2
    return bits if rng_bits == 32 else lax.convert_element_type(bits, jnp.dtype(f"uint{rng_bits}"))


def bits(key, shape, rng_bits: int):
    """The bits of a whole draw of ``shape``, flattened; None when not :func:`reproducible`.

    Flat counters (the 64-bit counter's low word; the high word is 0), reshaped by callers only
    after the float conversion: a reshaped iota would be hoisted out of loops and stored as a
    parameter-sized array.
    """
    size = math.prod(shape)
    if not reproducible(key, size):
        return None
    return counter_bits(key, lax.iota(np.uint32, size), rng_bits)


def normal_from_bits(bits, rng_bits: int, dtype):
    """``jax.random.normal``'s values from its bits: ``uniform(nextafter(-1, 0), 1)``, then
    √2 erf⁻¹, elementwise."""
    info = jnp.finfo(dtype)
    uint = jnp.dtype(f"uint{info.bits}")
    bits = lax.convert_element_type(bits, uint)
    one = np.array(1.0, dtype).view(uint)
    floats = lax.bitcast_convert_type((bits >> np.array(rng_bits - info.nmant, uint)) | one,
                                      dtype) - np.array(1.0, dtype)
    lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    minval, maxval = np.array(lo, dtype), np.array(1.0, dtype)
    uniform = lax.max(minval, floats * (maxval - minval) + minval)
    return np.array(np.sqrt(2), dtype) * lax.erf_inv(uniform)


def rademacher_from_bits(bits, dtype):
    """``jax.random.rademacher``'s values from its 32 bits: a uniform float32 is < 0.5 exactly
    when the top bit is 0."""
    return (1 - 2 * (bits >> np.uint32(31)).astype(jnp.int32)).astype(dtype)


def normal_rng_bits(dtype) -> int | None:
    """The bit width ``jax.random.normal`` draws for ``dtype``, None where not reproduced."""
    info = jnp.finfo(dtype)
    if info.bits not in (16, 32):
        return None
    return 8 if info.nmant < 8 else info.bits


def _row_counters(shape, rows):
    width = math.prod(shape[1:])
    rows = jnp.asarray(rows)
    counters = lax.broadcasted_iota(np.uint32, rows.shape + (width,), rows.ndim)
    offsets = lax.convert_element_type(rows, np.uint32) * np.uint32(width)
    return counters + offsets[..., None], rows.shape + tuple(shape[1:])


def normal_rows(key, shape, dtype, rows):
    """Rows ``rows`` (int array, any shape) of ``jax.random.normal(key, shape, dtype)``:
    shape ``rows.shape + shape[1:]``; None when not reproduced here."""
    rng_bits = normal_rng_bits(dtype)
    if rng_bits is None or not reproducible(key, math.prod(shape)):
        return None
    counters, out_shape = _row_counters(shape, rows)
    return normal_from_bits(counter_bits(key, counters, rng_bits), rng_bits,
                            dtype).reshape(out_shape)


def rademacher_rows(key, shape, dtype, rows):
    """Rows of ``jax.random.rademacher(key, shape, dtype)``, as :func:`normal_rows`."""
    if jax.config.jax_enable_x64 or not reproducible(key, math.prod(shape)):
        return None
    counters, out_shape = _row_counters(shape, rows)
    return rademacher_from_bits(counter_bits(key, counters, 32), dtype).reshape(out_shape)


# ---------------------------------------------------------------------------------------------
# The fast stream: both words of each hash.

def key_words(key):
    """The two uint32 words that key the fast stream: a Threefry key's own data, else two words
    drawn from the key."""
    if str(jax.random.key_impl(key)) == "threefry2x32":
        data = jax.random.key_data(key)
    else:
        data = jax.random.bits(key, (2,), jnp.uint32)
    return data[0], data[1]


def both_words(key, counters):
    """Both 32-bit words of the hash of each counter (uint32, any shape) under ``key``."""
    k1, k2 = key_words(key)
    return _threefry2x32(k1, k2, jnp.zeros(counters.shape, np.uint32), counters)


def _check_fast_size(shape, per_counter: int):
    size = math.prod(shape)
    if size > per_counter * 2**32:
        raise ValueError(f"stream='fast': a leaf of {size} entries is more than its counters "
                         f"reach ({per_counter} × 2³²).")


def _binomial(word1, word2, dtype):
    """(#ones of the 64 bits − 32) / 4: mean 0, variance 1, exact in every float dtype."""
    ones = lax.population_count(word1) + lax.population_count(word2)
    return ((ones.astype(jnp.int32) - 32).astype(jnp.float32) * np.float32(0.25)).astype(dtype)


def fast_normal(key, shape, dtype):
    """The fast stream's approximately normal draw of ``shape``: entry ``e`` is the standardized
    binomial of the 64 bits of the hash of counter ``e``."""
    _check_fast_size(shape, 1)
    word1, word2 = both_words(key, lax.iota(np.uint32, math.prod(shape)))
    return _binomial(word1, word2, dtype).reshape(shape)


def fast_normal_rows(key, shape, dtype, rows):
    """Rows ``rows`` of :func:`fast_normal` ``(key, shape, dtype)``, drawn alone."""
    _check_fast_size(shape, 1)
    counters, out_shape = _row_counters(shape, rows)
    return _binomial(*both_words(key, counters), dtype).reshape(out_shape)


def _signs(words, bit, dtype):
    """±1 from bit ``bit`` of ``words`` (+1 where it is 0), as a float32 sign bit."""
    sign = ((words >> bit) & np.uint32(1)) << np.uint32(31)
    return lax.bitcast_convert_type(sign | np.uint32(0x3F800000), jnp.float32).astype(dtype)


def packed_rademacher(key, shape, dtype):
    """The fast stream's Rademacher draw of ``shape``: entry ``e`` is bit ``e mod 32`` of word
    ``⌊e / 32⌋ mod 2`` of the hash of counter ``⌊e / 64⌋`` (+1 for a 0 bit)."""
    _check_fast_size(shape, 64)
    size = math.prod(shape)
    num = -(-size // 64)
    words = jnp.stack(both_words(key, lax.iota(np.uint32, num)), -1)  # (num, 2)
    # Computed and stored once: without the barrier XLA fuses the hash into the expansion and
    # computes it for each of the 64 entries of a counter.
    words = lax.optimization_barrier(words)
    bit = lax.broadcasted_iota(np.uint32, (num, 2, 32), 2)
    signs = _signs(words[..., None], bit, dtype).reshape(num * 64)
    return (signs if num * 64 == size else signs[:size]).reshape(shape)


def packed_rademacher_rows(key, shape, dtype, rows):
    """Rows ``rows`` of :func:`packed_rademacher` ``(key, shape, dtype)``: each entry's hash
    computed for it (the rows of a batch are few)."""
    _check_fast_size(shape, 64)
    entries, out_shape = _row_counters(shape, rows)
    word1, word2 = both_words(key, entries >> np.uint32(6))
    words = jnp.where((entries >> np.uint32(5)) & np.uint32(1), word2, word1)
    return _signs(words, entries & np.uint32(31), dtype).reshape(out_shape)
