"""The README's main job: `finetune demo` loads, compares and generates, and exits 0 only when all agree."""

from finetune.cli import main


def test_demo_reports_exact_parity(capsys):
    assert main(["demo", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert "max |logits - transformers logits| = 0.00e+00" in out
    assert "identical: True" in out
    assert "round trip ours -> to_hf -> transformers: max |diff| = 0.00e+00" in out
