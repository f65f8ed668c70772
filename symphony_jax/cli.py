"""The ``symphony-jax`` command line.

- ``reproduce [FIGURE ...] [--quick] [--out DIR]``: the paper's figures (``symphony_jax.figures``).
- ``simulate --system S --workload W --users N``: one simulated run and its metrics.
- ``bench NAME [--quick] [--out FILE]``: a benchmark of ``experiments/bench`` (source tree).
"""

from __future__ import annotations

import os

# The real-engine check runs two nodes on fake CPU devices; JAX reads this once, at start.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

import argparse  # noqa: E402
import pathlib  # noqa: E402
import runpy  # noqa: E402
import sys  # noqa: E402

from symphony_jax import __version__  # noqa: E402

BENCH_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments" / "bench"


def build_parser() -> argparse.ArgumentParser:
    from symphony_jax.cluster.systems import SYSTEMS
    from symphony_jax.figures import FIGURES
    from symphony_jax.figures.common import WORKLOADS

    parser = argparse.ArgumentParser(
        prog="symphony-jax",
        description=("KV-cache memory management for multi-turn LLM serving: SYMPHONY's "
                     "advisory-driven KV migration and the systems it is compared with."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command")

    reproduce = commands.add_parser("reproduce", help="reproduce the paper's figures")
    reproduce.add_argument("figures", nargs="*", metavar="FIGURE",
                           help=f"any of {', '.join(FIGURES)} (default: --quick, the headline "
                                "ones; otherwise all)")
    reproduce.add_argument("--quick", action="store_true", help="reduced scale (minutes)")
    reproduce.add_argument("--out", default="results", help="output folder (default: results)")
    reproduce.add_argument("--seed", type=int, default=0)
    reproduce.add_argument("--workload", default="sharegpt",
                           help=f"one of {', '.join(WORKLOADS)} (simulated figures)")
    reproduce.add_argument("--data", default="experiments/data",
                           help="folder of the traces (default: experiments/data)")

    simulate = commands.add_parser("simulate", help="simulate one system on one workload")
    simulate.add_argument("--system", required=True, help=f"one of {', '.join(SYSTEMS)}")
    simulate.add_argument("--workload", default="sharegpt",
                          help=f"one of {', '.join(WORKLOADS)}")
    simulate.add_argument("--users", type=int, required=True)
    simulate.add_argument("--nodes", type=int, default=8)
    simulate.add_argument("--model", default="llama-3.1-8b")
    simulate.add_argument("--gpu", default="A100-80GB")
    simulate.add_argument("--seconds", type=float, default=600.0, help="simulated time")
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--data", default="experiments/data")
    simulate.add_argument("--out", help="also write the requests' records to this CSV file")

    bench = commands.add_parser("bench", help="run a benchmark of experiments/bench")
    bench.add_argument("name", help="benchmark name (a script of experiments/bench)")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="its arguments (--quick, --out)")
    return parser


def _reproduce(args) -> None:
    from symphony_jax.figures import FIGURES, HEADLINE, figure

    names = args.figures or (HEADLINE if args.quick else FIGURES)
    modules = [figure(name) for name in names]  # every name checked before any run
    overrides = {"workload": args.workload, "data_dir": args.data}
    for name, module in zip(names, modules):
        print(f"[{name}]", flush=True)
        extra = {} if name == "real_check" else overrides
        result = module.run(args.out, quick=args.quick, seed=args.seed, progress=True, **extra)
        print(result.summary + "\n\nwrote " + ", ".join(str(f) for f in result.files), flush=True)


def _simulate(args) -> None:
    from symphony_jax import metrics
    from symphony_jax.cluster.systems import system
    from symphony_jax.figures.common import Study

    study = Study(model=args.model, gpu=args.gpu, nodes=args.nodes, seconds=args.seconds,
                  warmup_s=0.0, workload=args.workload, data_dir=args.data)
    records = study.simulate(system(args.system), args.users, args.seed)
    print(metrics.format_summary(records.summary()))
    if args.out:
        records.requests.to_csv(args.out)


def _bench(args) -> None:
    scripts = sorted(p.stem for p in BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
    if args.name not in scripts:
        where = f"one of {', '.join(scripts)}" if scripts else \
            f"a script of {BENCH_DIR} (run from a source checkout)"
        raise ValueError(f"unknown benchmark {args.name!r}: expected {where}")
    sys.path.insert(0, str(BENCH_DIR))
    sys.argv = [str(BENCH_DIR / f"{args.name}.py"), *args.args]
    runpy.run_path(sys.argv[0], run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"reproduce": _reproduce, "simulate": _simulate, "bench": _bench}
    if args.command is None:
        parser.print_help()
        return 0
    try:
        commands[args.command](args)
    except ValueError as error:
        parser.exit(2, f"symphony-jax {args.command}: error: {error}\n")
    return 0
