"""From tensors in a weights file to ``LlamaParams``: layouts, dtypes, shape and name checks.

The loaders (``hf_weights``, ``gguf_weights``) and the checkpointer (``checkpoint``) share this
module. A loader supplies one function, ``read(field, layer, shape)``, that returns one tensor as
its file stores it — ``[out, in]`` for linear weights, like ``torch.nn.Linear`` and GGUF (whose
dimension order, reversed, is the same) — after checking that it has ``shape``;
``assemble_params`` transposes, casts and stacks the layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from symphony_jax.config import DTYPES, ModelConfig
from symphony_jax.model.params import LayerParams, LlamaParams, expected_shapes


class WeightsError(ValueError):
    """A weights, checkpoint or tokenizer file cannot be read or written; the message names the
    file, the tensor or key, and what was expected."""


LAYER_FIELDS = tuple(field.name for field in dataclasses.fields(LayerParams))
LINEAR_FIELDS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"})

# read(field, layer or None, shape in the file's layout) -> that tensor, in the file's layout.
TensorReader = Callable[[str, int | None, tuple[int, ...]], np.ndarray]


def resolve_dtype(dtype) -> str:
    """The name of ``dtype`` (a string or a NumPy/JAX dtype) if parameters may have it."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise WeightsError(f"dtype={dtype!r}: expected one of {', '.join(DTYPES)}")
    return name


def tensor_keys(config: ModelConfig) -> list[tuple[str, int | None]]:
    """Every ``(field, layer)`` a model with ``config`` is loaded from (layer None: not per
    layer)."""
    keys = [("embed", None), ("final_norm", None)]
    keys += [(field, layer) for layer in range(config.num_layers) for field in LAYER_FIELDS]
    if not config.tie_word_embeddings:
        keys.append(("lm_head", None))
    return keys


def check_tensor_names(where: str, present: Iterable[str], expected: Iterable[str]) -> None:
    """Raise unless the tensor names ``present`` in a file are exactly the ``expected`` ones."""
    present, expected = set(present), set(expected)
    for problem, names in (("missing", expected - present), ("unexpected", present - expected)):
        if names:
            listed = ", ".join(sorted(names)[:5]) + (", ..." if len(names) > 5 else "")
            raise WeightsError(f"{where}: {len(names)} {problem} tensor(s) for a Llama model with "
                               f"this config: {listed}")


def check_shape(where: str, actual: Iterable[int], expected: tuple[int, ...]) -> None:
    actual = tuple(int(n) for n in actual)
    if actual != expected:
        raise WeightsError(f"{where}: shape {actual}, expected {expected}")


def file_shape(field: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a parameter of ``shape`` has in a weights file (linear weights: ``[out, in]``)."""
    return shape[::-1] if field in LINEAR_FIELDS else shape


def assemble_params(config: ModelConfig, read: TensorReader) -> LlamaParams:
    """Parameters in ``config.dtype`` from the tensors ``read`` returns, one layer at a time.

    Each stacked parameter is filled in host memory and moved to the device before the next one
    is read: besides the device copy, loading holds one parameter and one file tensor in memory.
    """
    dtype = config.jnp_dtype
    shapes = expected_shapes(config)

    def one(field: str, shape: tuple[int, ...], layer: int | None = None) -> np.ndarray:
        tensor = read(field, layer, file_shape(field, shape))
        return tensor.T if field in LINEAR_FIELDS else tensor

    def stacked(field: str) -> jax.Array:
        shape = getattr(shapes.layers, field)
        host = np.empty(shape, dtype)
        for layer in range(shape[0]):
            host[layer] = one(field, shape[1:], layer)
        return jnp.asarray(host)

    def single(field: str) -> jax.Array:
        return jnp.asarray(np.asarray(one(field, getattr(shapes, field)), dtype))

    return LlamaParams(
        embed=single("embed"),
        layers=LayerParams(**{field: stacked(field) for field in LAYER_FIELDS}),
        final_norm=single("final_norm"),
        lm_head=None if config.tie_word_embeddings else single("lm_head"),
    )


def abstract_params(config: ModelConfig, sharding: jax.sharding.Sharding | None = None
                    ) -> LlamaParams:
    """``jax.ShapeDtypeStruct`` of every parameter of ``config``, in ``config.dtype``."""
    return jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, config.jnp_dtype,
                                                           sharding=sharding),
                        expected_shapes(config), is_leaf=lambda node: isinstance(node, tuple))


def check_params(where: str, params: LlamaParams, config: ModelConfig) -> None:
    """Raise unless ``params`` has exactly the shapes and dtype ``config`` describes."""
    expected = abstract_params(config)
    if jax.tree.structure(params) != jax.tree.structure(expected):
        raise WeightsError(
            f"{where}: params do not have the layout of this config (lm_head must be None exactly "
            f"when tie_word_embeddings={config.tie_word_embeddings})")
    for (path, leaf), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                  jax.tree.leaves(expected)):
        if (leaf.shape, leaf.dtype) != (spec.shape, spec.dtype):
            raise WeightsError(
                f"{where}: params{jax.tree_util.keystr(path)} is {leaf.dtype}{list(leaf.shape)}, "
                f"expected {spec.dtype}{list(spec.shape)} (config.dtype={config.dtype!r})")
