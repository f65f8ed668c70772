"""The project's entry points: CLI, README command, CI script, benchmark."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import symphony_jax
from symphony_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"symphony-jax {symphony_jax.__version__}"
    assert cli.main([]) == 0
    assert "usage: symphony-jax" in capsys.readouterr().out


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "symphony_jax", "--help"],
                            capture_output=True, text=True, check=True)
    assert "KV-cache memory management" in result.stdout


def test_readme_starts_with_the_main_job_then_the_tests_which_ci_runs():
    readme = (ROOT / "README.md").read_text()
    main_job, command = re.findall(r"```bash\n(.+?)\n```", readme)[:2]
    assert main_job.endswith("symphony-jax reproduce --quick") and "pytest" in command
    ci_commands = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [command]


def load_benchmark(name: str):
    """A benchmark script as a module, importing its neighbours as it does when run."""
    bench = ROOT / "experiments" / "bench"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    sys.path.insert(0, str(bench))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(bench))
    return module


@pytest.mark.slow
@pytest.mark.parametrize("name, row", [
    ("block_table", r"\| 8 of 8 layer groups \(8 nodes, vmap\) \|.*\| [\d.]+x \|"),
    ("scheduler", r"\| 8 \(vmap\) \|.*\| [\d.]+x \|[\s\S]*\| 32 \| .*\| [\d.]+x \|"),
    ("attention", r"\| decode \| ours \|[\s\S]*\| prefill \| ours \|"),
    ("model", r"\| 4 \| [\d,]+ \| [\d.]+ ms \|"),
    ("workloads", r"\| sharegpt_like: 10,000 sessions .*\| generate \| [\d.]+ s \|"
                  r"[\s\S]*\| 100,000 requests: summarize: all of the above \| compute \|"),
    ("prompt_hashing", r"\| 2,048 \| .* \| [\d.]+x \|[\s\S]*\| 64 \| [\d,]+ us \|"),
])
def test_benchmark_runs(name, row):
    """The benchmarks run end to end at small sizes (they check their own results)."""
    assert re.search(row, load_benchmark(name).main(["--quick"]))
