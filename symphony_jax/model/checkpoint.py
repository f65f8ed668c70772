"""Save and restore parameters with Orbax, the model config stored beside them as JSON.

A checkpoint directory holds ``model_config.json`` and ``params/`` (Orbax's format). Restoring
reads the config first and restores into arrays of exactly its shapes and dtype, on a given
device or sharding (for example a host memory kind).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from symphony_jax.config import ModelConfig, RopeScaling
from symphony_jax.model.params import LlamaParams
from symphony_jax.model.weights import WeightsError, abstract_params, check_params

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def save_params(directory: str | pathlib.Path, params: LlamaParams, config: ModelConfig) -> None:
    """Write ``params`` (which must match ``config`` exactly) and ``config`` to a new checkpoint."""
    directory = pathlib.Path(directory).absolute()
    check_params(str(directory), params, config)
    if (directory / PARAMS_DIR).exists() or (directory / CONFIG_FILE).exists():
        raise WeightsError(f"{directory}: already holds a checkpoint; save to a new directory")
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, params)
        checkpointer.wait_until_finished()
    # Written last: a directory with a config holds a complete checkpoint.
    (directory / CONFIG_FILE).write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")


def load_params(directory: str | pathlib.Path,
                sharding: jax.sharding.Sharding | jax.Device | None = None
                ) -> tuple[ModelConfig, LlamaParams]:
    """The config and parameters saved by ``save_params`` in ``directory``.

    ``sharding``: where every array goes (a device, or a sharding such as
    ``SingleDeviceSharding(device, memory_kind="pinned_host")``); default: the default device.
    """
    directory = pathlib.Path(directory).absolute()
    config = _read_config(directory / CONFIG_FILE)
    if isinstance(sharding, jax.Device):
        sharding = jax.sharding.SingleDeviceSharding(sharding)
    target = abstract_params(
        config, sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    params_dir = directory / PARAMS_DIR
    if not params_dir.is_dir():
        raise WeightsError(f"{params_dir}: missing (an interrupted save_params?)")
    with ocp.StandardCheckpointer() as checkpointer:
        _check_stored(params_dir, checkpointer.metadata(params_dir).item_metadata, target)
        return config, checkpointer.restore(params_dir, target)


def _check_stored(params_dir: pathlib.Path, stored_tree, target: LlamaParams) -> None:
    """Raise unless the arrays stored are exactly those the saved config describes (Orbax would
    otherwise cast dtypes silently)."""
    stored = {array.name: (tuple(array.shape), jnp.dtype(array.dtype))
              for array in jax.tree.leaves(stored_tree)}
    expected = {".".join(key.name for key in path): (spec.shape, spec.dtype)
                for path, spec in jax.tree_util.tree_flatten_with_path(target)[0]}
    for name in sorted(stored.keys() | expected.keys()):
        if stored.get(name) != expected.get(name):
            raise WeightsError(f"{params_dir}: {name} is stored as {_describe(stored.get(name))}; "
                               f"{CONFIG_FILE} says {_describe(expected.get(name))}")


def _describe(array: tuple | None) -> str:
    if array is None:
        return "nothing"
    shape, dtype = array
    return f"{dtype}{list(shape)}"


def _read_config(path: pathlib.Path) -> ModelConfig:
    if not path.is_file():
        raise WeightsError(f"{path}: missing (not a checkpoint written by save_params?)")
    try:
        fields = json.loads(path.read_text())
        scaling = fields.pop("rope_scaling")
        return ModelConfig(**fields, rope_scaling=scaling and RopeScaling(**scaling))
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise WeightsError(f"{path}: not a valid model config: {error!r}") from None
