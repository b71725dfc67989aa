"""The wheel carries what an installed lqlr needs: the Hydra configs, the kernel source, the offline assets."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_ships_configs_kernels_and_assets(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"cannot build a wheel here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = tmp_path.glob("lqlr-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {p.relative_to(ROOT).as_posix() for p in (ROOT / "lqlr" / "cli" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names  # every config group, hydra launchers included
    for f in ("lqlr/nn/kernels/qlr_cpu.cpp", "lqlr/util/llamacpp_logits.cpp",
              "lqlr/assets/stories260K/model.safetensors",
              "lqlr/assets/stories260K/tokenizer.json", "lqlr/assets/wikitext-2-raw/wiki.test.raw",
              "lqlr/assets/wikitext-2-raw/wiki.valid.raw", "lqlr/assets/README.md"):
        assert f in names, f
    assert not any(n.startswith(("tests/", "experiments/", "results/")) for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for cmd in ("lqlr-compress", "lqlr-eval", "lqlr-finetune", "lqlr-diagnose", "lqlr-bench", "lqlr-export"):
        assert cmd in scripts
