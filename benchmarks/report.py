"""The README's performance section from the last benchmark runs: each `<!-- results: FILE -->` ...
`<!-- /results -->` block of README.md becomes benchmarks/results/FILE as the last run wrote it, and
benchmarks/results/ratios.png plots the ratios of those runs (matplotlib; `pip install matplotlib`).

    python benchmarks/report.py            # after any benchmark run; tests/test_benchmark_report.py checks it

The PNG records a digest of the results it was drawn from (its `Description` text chunk), so a test can tell a
stale plot without matplotlib.
"""
from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
PNG = RESULTS / "ratios.png"
# a block never spans another block's start: a lost closing marker is an error, not a silent deletion
BLOCK = re.compile(r"(<!-- results: (?P<file>[\w.\-]+) -->\n)(?P<body>(?:(?!<!-- results:).)*?)"
                   r"(<!-- /results -->)", re.S)
PLOTTED = ("latest.json", "methods.json", "many.json", "generate.json", "compiled.json")


def render_readme(text: str) -> str:
    """README text with every results block replaced by its file's current content."""
    def fill(m: re.Match) -> str:
        body = (RESULTS / m.group("file")).read_text().strip()
        body = re.sub(r"(?m)^#+ (.*)$", r"**\1**", body)   # a report's own title: bold, not a README heading
        return f"{m.group(1)}{body}\n{m.group(4)}"
    return BLOCK.sub(fill, text)


def digest() -> str:
    """What the plot is drawn from: a hash of the plotted results files."""
    h = hashlib.sha256()
    for name in PLOTTED:
        p = RESULTS / name
        h.update(name.encode() + b"\0" + (p.read_bytes() if p.exists() else b""))
    return h.hexdigest()


def png_description(path: Path) -> str | None:
    """The `Description` tEXt chunk of a PNG (read with the standard library)."""
    import struct
    data = path.read_bytes()
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and chunk.startswith(b"Description\0"):
            return chunk.split(b"\0", 1)[1].decode("latin-1")
        pos += 12 + length
    return None


def _series() -> list[tuple[str, list[str], list[tuple[str, list[float]]]]]:
    """(title, labels, [(legend, values)]) per panel, from the results present."""
    panels = []
    p = RESULTS / "latest.json"
    if p.exists():
        rows = json.loads(p.read_text())["variants"]
        panels.append(("one forward, small-llama (vs eager base)", [r["variant"].split(" (")[0] for r in rows],
                       [("time / base", [r["ratio_vs_base"] for r in rows])]))
    p = RESULTS / "methods.json"
    if p.exists():
        rows = json.loads(p.read_text())["rows"]
        panels.append(("each method unmerged (vs eager base)", [r["method"] for r in rows],
                       [("peft", [r["peft_ratio"] for r in rows]), ("peftc", [r["peftc_ratio"] for r in rows])]))
    p = RESULTS / "many.json"
    if p.exists():
        rows = json.loads(p.read_text())["rows"]
        panels.append(("many adapters (vs eager base)", [r["case"] for r in rows],
                       [("peft", [r["peft"] for r in rows]), ("peftc", [r["peftc"] for r in rows])]))
    p = RESULTS / "generate.json"
    if p.exists():
        rows = json.loads(p.read_text())["rows"]
        panels.append(("decode tokens/s, small-llama (vs transformers eager generate)", [r["variant"] for r in rows],
                       [("tokens/s / transformers", [r["ratio_vs_transformers"] for r in rows])]))
    p = RESULTS / "compiled.json"
    if p.exists():
        rows = {r["library"]: r for r in json.loads(p.read_text())["rows"]}
        panels.append(("torch.compile (inductor), small-llama, unmerged (vs compiled base)", ["LoRA", "DoRA"],
                       [(lib, [rows[lib]["lora_vs_base"], rows[lib]["dora_vs_base"]]) for lib in ("peft", "peftc")
                        if lib in rows]))
    return panels


def plot(path: Path = PNG) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = _series()
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.2 * len(panels)), squeeze=False)
    for ax, (title, labels, series) in zip(axes[:, 0], panels):
        width = 0.8 / len(series)
        for i, (legend, values) in enumerate(series):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(labels))]
            ax.bar(xs, values, width, label=legend)
        ax.axhline(1.0, color="gray", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("ratio")
        ax.set_title(title, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80, metadata={"Description": digest()})
    plt.close(fig)


def main() -> int:
    text = README.read_text()
    if not BLOCK.search(text):
        print("README.md has no <!-- results: FILE --> blocks", file=sys.stderr)
        return 1
    README.write_text(render_readme(text))
    plot()
    print(f"updated README.md from benchmarks/results/ and wrote {PNG.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
