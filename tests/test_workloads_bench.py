"""The workloads and metrics benchmark runs (smoke test at 10x smaller sizes)."""

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_workloads_benchmark_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments" / "bench"))
    try:
        import workloads as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "report.md"
    text = bench.main(["--quick", "--out", str(out)])
    assert re.search(r"\| sharegpt_like: 10,000 sessions .*\| generate \| [\d.]+ s \|", text)
    assert re.search(r"\| 100,000 requests: summarize: all of the above \| compute \|", text)
    assert "numpy" in text and out.read_text().startswith("# Workloads and metrics on a CPU")
