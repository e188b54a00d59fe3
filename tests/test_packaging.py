"""The wheel: hatchling packs grammar/ and passes/ into peftc/_data, and an installed peftc (no source
checkout on the path) finds its grammars and method library there."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
DATA = ["peftc/_data/grammar/spec.lark", "peftc/_data/grammar/method.lark"] + [
    f"peftc/_data/passes/{n}.peft" for n in ("lora", "dora", "ia3", "rules")]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "-w", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=out)
    assert r.returncode == 0, f"pip wheel failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    wheels = list(out.glob("peftc-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return wheels[0]


def test_wheel_contains_the_data_files(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [d for d in DATA if d not in names]
    assert not missing, f"missing from the wheel: {missing}"
    assert "peftc/__init__.py" in names and "peftc/cli.py" in names
    # the data files are the repository's, byte for byte
    with zipfile.ZipFile(wheel) as z:
        for d in DATA:
            src = REPO / d.replace("peftc/_data/", "")
            assert z.read(d) == src.read_bytes(), f"{d} differs from {src}"


def test_wheel_has_no_stray_top_level_packages(wheel):
    tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
    assert tops == {"peftc", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}, tops


def test_wheel_declares_the_console_script(wheel):
    with zipfile.ZipFile(wheel) as z:
        ep = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        text = z.read(ep).decode()
    assert "[console_scripts]" in text and "peftc = peftc.cli:main" in text, text


PROBE = r"""
import json, peftc
from peftc.library import library
from peftc.resources import data_dir
lib = library()
spec = peftc.parse_spec('adapter a: lora(r = 2) { targets q_proj }')
print(json.dumps({
    "peftc": peftc.__file__,
    "passes": str(data_dir("passes")),
    "grammar": str(data_dir("grammar")),
    "methods": sorted(lib.methods),
    "rules": len(lib.rules),
    "parsed": sorted(spec.adapters),
}))
"""


def test_unpacked_wheel_loads_its_data(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONPATH"] = str(site)
    r = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    site = site.resolve()
    assert Path(info["peftc"]).resolve().is_relative_to(site), info
    assert Path(info["passes"]).resolve() == site / "peftc" / "_data" / "passes", info
    assert Path(info["grammar"]).resolve() == site / "peftc" / "_data" / "grammar", info
    assert {"lora", "dora", "ia3"} <= set(info["methods"]), info
    assert info["rules"] > 0, info
    assert info["parsed"] == ["a"]
