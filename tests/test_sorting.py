"""The scheduler's single-operand sorts order like numpy's ``lexsort``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from symphony_jax.scheduler import sorting

small_ints = st.integers(-3, 3)  # many ties
LEXSORT = jax.jit(sorting.lexsort)
times = st.sampled_from([-np.inf, -2.5, -0.0, 0.0, 1e-30, 0.5, 0.5, 7.0, 3e38, np.inf])


@given(st.sampled_from([1, 24]).flatmap(lambda n: st.tuples(  # two shapes: two compilations
    st.lists(small_ints, min_size=n, max_size=n), st.lists(times, min_size=n, max_size=n),
    st.lists(st.integers(-2**31, 2**31 - 1), min_size=n, max_size=n))))
def test_lexsort_equals_numpys(keys):
    ints, floats, wide = (np.array(keys[0], np.int32), np.array(keys[1], np.float32),
                          np.array(keys[2], np.int32))
    for combo in ((ints,), (floats,), (wide,), (wide, ints), (ints, floats, ints),
                  (wide, floats, ints)):
        np.testing.assert_array_equal(LEXSORT(tuple(jnp.asarray(k) for k in combo)),
                                      np.lexsort(combo))


def test_sortable_keeps_the_order_of_floats():
    x = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf], np.float32)
    keys = np.asarray(sorting.sortable(jnp.asarray(x)))
    assert (np.diff(keys) >= 0).all() and keys[4] == keys[5]  # -0.0 == 0.0
    assert (np.diff(keys)[[i for i in range(9) if i != 4]] > 0).all()


def test_too_many_values_are_refused():
    with pytest.raises(ValueError, match="at most 46340"):
        sorting.lexsort((jnp.zeros(46341, jnp.int32),))
