"""Commands start fast: what they import before their work begins (measured, not timed: heavy modules absent)."""

import subprocess
import sys

import pytest

HEAVY = ("torch", "lightning", "transformers", "datasets", "peft", "bitsandbytes")


def imported_after(code: str) -> set[str]:
    """The HEAVY modules a fresh interpreter has imported after running ``code``."""
    probe = f"{code}\nimport sys\nprint(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split("\n")[-2].split()) if out.stdout.strip() else set()


@pytest.mark.parametrize("argv", [["--help"], ["recipes"]])
def test_help_and_recipes_import_no_framework(argv):
    quiet = "import contextlib, io\nfrom finetune.cli import main\nwith contextlib.redirect_stdout(io.StringIO()):\n"
    code = f"{quiet}    main({argv!r})"
    assert imported_after(code) == set()


def test_inference_needs_torch_but_not_lightning_or_datasets():
    assert imported_after("import finetune.inference") == {"torch"}


def test_the_fit_cli_is_still_reachable_from_finetune_cli():
    from finetune.cli import FinetuneCLI
    from finetune.lightning_cli import FinetuneCLI as Defined

    assert FinetuneCLI is Defined
