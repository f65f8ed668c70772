"""The project's entry points: CLI, README command, CI script, benchmark."""

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


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"```bash\n(.+?)\n```", readme).group(1)
    assert "pytest" in command
    ci_commands = [line for line in (ROOT / ".ci/run").read_text().splitlines()
                   if line and not line.startswith(("#", "set ", "cd "))]
    assert ci_commands == [command]


@pytest.mark.slow
def test_block_table_benchmark_runs():
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    try:
        import block_table as bench
    finally:
        sys.path.pop(0)
    text = bench.main(["--quick"])
    assert re.search(r"\| 64 \(8 nodes x 8 groups, vmap\) \|.*\| [\d.]+x \|", text)
    assert "KV write only" in text
