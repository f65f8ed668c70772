"""The paper's figures, each a function over the public API (``symphony-jax reproduce``).

``FIGURES`` maps a name to its module; each module's ``run(out, *, quick, seed, progress)``
writes ``<name>.csv``, ``.png`` and ``.md`` into ``out`` (see ``figures.common``). All but
``real_check`` simulate; ``real_check`` serves with the real engine on fake CPU devices.
"""

from __future__ import annotations

import importlib

FIGURES = ("redundancy", "main_result", "load_balance", "ablations", "real_check")
HEADLINE = ("redundancy", "main_result", "load_balance")  # what --quick reproduces by default


def figure(name: str):
    """The module of figure ``name``."""
    if name not in FIGURES:
        raise ValueError(f"unknown figure {name!r}: expected one of {', '.join(FIGURES)}")
    return importlib.import_module(f"symphony_jax.figures.{name}")
