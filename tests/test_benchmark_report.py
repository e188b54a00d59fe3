"""The README's performance section is the last benchmark runs' reports, and the plot is drawn from them
(benchmarks/report.py); neither needs matplotlib to check."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_tables_are_the_last_runs():
    report = _report()
    text = report.README.read_text()
    files = [m.group("file") for m in report.BLOCK.finditer(text)]
    assert {"latest.md", "methods.md", "many.md", "cli_startup.md"} <= set(files)
    assert report.render_readme(text) == text, "run python benchmarks/report.py"
    # every block is closed: an unclosed one would swallow the README up to the next block's end
    assert text.count("<!-- results: ") == text.count("<!-- /results -->") == len(files)


def test_plot_is_drawn_from_the_current_results():
    report = _report()
    assert report.PNG.exists() and "benchmarks/results/ratios.png" in report.README.read_text()
    assert report.png_description(report.PNG) == report.digest(), "run python benchmarks/report.py"
