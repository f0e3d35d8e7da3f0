"""``scripts/gpu_check.sh`` on a CPU (tiny sizes): every GPU-only row reports "skipped: no GPU", every other row
passes; and a row that runs past its timeout is reported as failed while the table still comes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402


def _run(*args: str, script: str = "gpu_check.sh") -> subprocess.CompletedProcess:
    command = (
        ["bash", str(ROOT / "scripts" / script)]
        if script.endswith(".sh")
        else [sys.executable, str(ROOT / "scripts" / script)]
    )
    # The CPU report, also on a machine with a GPU (the GPU rows must then say "skipped: no GPU").
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)


@pytest.mark.slow
def test_cpu_report_skips_gpu_rows_and_passes_the_rest(tmp_path):
    out = tmp_path / "results.json"
    proc = _run("--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    gpu_rows = {r.name for r in gpu_check.ROWS if r.gpu} | {"train-gc-memory"}
    assert set(results) == {r.name for r in gpu_check.ROWS} | {"train-gc-memory"}
    for name, r in results.items():
        assert r["result"] == ("skipped: no GPU" if name in gpu_rows else "pass"), (name, r)
    assert {n for n in results if n.startswith("train-")} == {
        f"train-{p}-{m}{g}" for p in ("bf16-mixed", "bf16-true") for m in ("lora", "full") for g in ("", "-gc")
    } | {"train-gc-memory"}
    assert "trained weights bfloat16" in results["train-bf16-true-lora"]["detail"]
    assert "trained weights float32" in results["train-bf16-mixed-full-gc"]["detail"]
    lines = proc.stdout.splitlines()
    assert "| claim | result | detail |" in lines
    rows = [line for line in lines if line.startswith("| ") and "claim | result" not in line]
    assert len(rows) == len(results)  # one table line per row


def test_a_row_past_its_timeout_fails_and_the_table_still_comes(tmp_path):
    out = tmp_path / "results.json"
    proc = _run("--only", "train-bf16-true-lora", "--row-timeout", "1", "--json", str(out), script="gpu_check.py")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["train-bf16-true-lora"]["result"] == "fail: timed out after 1 s"
    assert results["train-gc-memory"]["result"] == "skipped: no GPU"
    assert "| full" not in proc.stdout and "fail: timed out after 1 s" in proc.stdout
