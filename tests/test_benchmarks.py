"""The benchmarks' quick modes, so they cannot rot."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_accuracy_benchmark_quick(tmp_path):
    out = tmp_path / "acc.json"
    r = subprocess.run([sys.executable, "benchmarks/accuracy.py", "--quick", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    methods = {row["method"] for row in rows if row["bits"] == "w4a4"}
    assert methods == {"noise", "mse", "gznq_m0", "gznq_m1", "gznq_m3", "pixel_m1", "real"}
    assert all(0 < row["mean"] <= 100 and row["wall_s"] > 0 for row in rows)
    assert "vs real" in r.stdout


def test_speed_benchmark_quick():
    r = subprocess.run([sys.executable, "benchmarks/speed.py", "--quick"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step/floor" in r.stdout and r.stdout.count("default") == 2
