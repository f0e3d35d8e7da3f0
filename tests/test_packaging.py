"""A plain (non-editable) install ships the bundled recipes, their data and the adapter presets inside the
package."""

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
    package = root / "finetune"
    for init in package.rglob("__init__.py"):  # every subpackage ships (pyproject lists them by hand)
        assert f"finetune/{init.relative_to(package).as_posix()}" in names, f"{init.parent} is missing from the wheel"
    for recipe in bundled.bundled():
        assert f"finetune/recipes/{recipe}.yaml" in names
    assert "finetune/recipes/data/quickstart/train.txt" in names
    assert "finetune/recipes/data/quickstart/tokenizer/tokenizer.json" in names
    from finetune.adapters import presets

    for preset in presets():
        assert f"finetune/adapter_presets/{preset}.yaml" in names

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip puts in site-packages
    code = (
        "from finetune import bundled; "
        "print(bundled.recipes_dir()); print(bundled.resolve_path('data/quickstart/train.txt')); "
        "print(sorted(bundled.bundled())); from finetune.adapters import presets, load_spec; "
        "print(presets()['qlora'].parent); print(load_spec('qlora').quantize)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    recipes_dir, train, listed, presets_dir, quantize = out.stdout.splitlines()
    assert presets_dir == str(site / "finetune" / "adapter_presets") and quantize == "nf4"
    assert recipes_dir == str(site / "finetune" / "recipes")
    assert train == str(site / "finetune" / "recipes" / "data" / "quickstart" / "train.txt")
    assert listed == str(sorted(bundled.bundled()))
