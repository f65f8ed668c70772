"""The ``symphony-jax`` command line."""

from __future__ import annotations

import argparse

from symphony_jax import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="symphony-jax",
        description=(
            "KV-cache memory management for multi-turn LLM serving: SYMPHONY's advisory-driven "
            "KV migration and the systems it is compared with, on a paged-KV JAX engine."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0
