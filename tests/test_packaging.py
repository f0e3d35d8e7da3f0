"""A plain (non-editable) install ships the bundled recipes and their data inside the package."""

import subprocess
import sys
import zipfile

import pytest

from finetune import bundled


@pytest.mark.slow
def test_wheel_ships_recipes_and_finds_them(tmp_path):
    root = bundled.recipes_dir().parent
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(root), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
    )
    (wheel,) = tmp_path.glob("finetune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in bundled.bundled():
        assert f"finetune/recipes/{recipe}.yaml" in names
    assert "finetune/recipes/data/quickstart/train.txt" in names
    assert "finetune/recipes/data/quickstart/tokenizer/tokenizer.json" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip puts in site-packages
    code = (
        "from finetune import bundled; "
        "print(bundled.recipes_dir()); print(bundled.resolve_path('data/quickstart/train.txt')); "
        "print(sorted(bundled.bundled()))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    recipes_dir, train, listed = out.stdout.splitlines()
    assert recipes_dir == str(site / "finetune" / "recipes")
    assert train == str(site / "finetune" / "recipes" / "data" / "quickstart" / "train.txt")
    assert listed == str(sorted(bundled.bundled()))
