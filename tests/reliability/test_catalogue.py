"""The reliability catalogue: one bad input per folder of ``cases/``, each reported with the file, row or key.

Each ``cases/<name>/case.yaml`` says what to build (``data``: DataModule arguments, the recipe's ``data:``
section, set up for ``stage``; or ``model``: a task's arguments, its model built) and the error it must raise:
``error`` (a builtin exception name, default ValueError) whose message holds every ``expect`` fragment. ``{dir}``
stands for the case's folder (copied into a temporary folder first) and ``{tokenizer}`` for a tiny tokenizer folder.
See cases/README.md.
"""

import builtins
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

import finetune.tasks
from finetune.data import DataModule

CASES = Path(__file__).parent / "cases"
NAMES = sorted(p.name for p in CASES.iterdir() if p.is_dir())


def fill(value, subs: dict[str, str]):
    """``value`` with each ``{key}`` of ``subs`` replaced in its strings (other braces stay: messages hold them)."""
    if isinstance(value, str):
        for key, text in subs.items():
            value = value.replace("{" + key + "}", text)
        return value
    if isinstance(value, dict):
        return {k: fill(v, subs) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, subs) for v in value]
    return value


def run_case(case: dict, tokenizer: str, cache: Path) -> None:
    """Does what a case says; the error it raises is the test's subject."""
    if "data" in case:
        dm = DataModule(
            **{"tokenizer": AutoTokenizer.from_pretrained(tokenizer), "cache_dir": str(cache), **case["data"]}
        )
        dm.setup(case.get("stage", "fit"))
    else:
        model = dict(case["model"])
        task = getattr(finetune.tasks, model.pop("class"))(**model)
        task.build_model()


def test_every_case_is_complete():
    assert len(NAMES) >= 15
    for name in NAMES:
        case = yaml.safe_load((CASES / name / "case.yaml").read_text())
        assert set(case) <= {"data", "model", "stage", "error", "expect"}, name
        assert ("data" in case) != ("model" in case) and case["expect"], name
        assert any("{dir}" in e or "field" in e for e in case["expect"]), f"{name}: name the file, row or key"


@pytest.mark.parametrize("name", NAMES)
def test_bad_input_is_reported(name, tmp_path, tokenizer_folder):
    folder = tmp_path / name
    shutil.copytree(CASES / name, folder)
    subs = {"dir": str(folder), "tokenizer": str(tokenizer_folder("gpt"))}
    case = fill(yaml.safe_load((folder / "case.yaml").read_text()), subs)
    with pytest.raises(getattr(builtins, case.get("error", "ValueError"))) as raised:
        run_case(case, subs["tokenizer"], tmp_path / "cache")
    for fragment in case["expect"]:
        assert fragment in str(raised.value), f"{name}: {fragment!r} not in the error:\n{raised.value}"
