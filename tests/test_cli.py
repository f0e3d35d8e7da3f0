"""The README's main job: `finetune demo` loads, compares and generates, and exits 0 only when all agree."""

import re

from finetune.cli import main


def test_demo_reports_parity(capsys):
    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    diffs = [float(x) for x in re.findall(r"max \|.*?\| = ([0-9.e+-]+)", out)]
    assert len(diffs) == 2 and max(diffs) < 1e-5, out  # logits, and the to_hf round trip
    assert "identical: True" in out
