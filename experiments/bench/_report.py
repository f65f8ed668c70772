"""The command line shared by the benchmarks: ``[--quick] [--out FILE.md]``."""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
from collections.abc import Callable


def main(script: str, doc: str, report: Callable[[bool], str],
         argv: list[str] | None = None) -> str:
    """Print ``report(quick)``; with ``--out``, also write it to a markdown file headed by the
    command that made it."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats")
    parser.add_argument("--out", help="also write the report to this markdown file")
    args = parser.parse_args(argv)
    text = report(args.quick)
    print(text)
    if args.out:
        repository = pathlib.Path(__file__).resolve().parents[2]
        name = pathlib.Path(script).resolve().relative_to(repository).as_posix()
        command = " ".join(["python", name, *(sys.argv[1:] if argv is None else argv)])
        title = doc.splitlines()[0].rstrip(".")
        pathlib.Path(args.out).write_text(f"# {title}\n\n`{command}`\n\n{text}\n")
    return text


def machine() -> str:
    """The processor model and core count, as far as the platform tells."""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores"
