"""A run folder is untrusted: its config.yaml may name only the toolkit's task classes, and its checkpoint's
hyperparameters must be plain constructor arguments. Nothing else it names is imported or called, by export,
generate or chat."""

import io
import shutil
import sys

import pytest
import torch
import yaml

from finetune.cli import chat_command, generate_command, main
from finetune.export import load_run
from tests.export.test_export_errors import trained  # noqa: F401 (the module's LoRA run fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def run(tmp_path, trained):  # noqa: F811
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    return copy


def _name_class(run, class_path: str) -> None:
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["model"]["class_path"] = class_path
    (run / "config.yaml").write_text(yaml.safe_dump(config))


def _every_entry_point(run, tmp_path, capsys) -> list[str]:
    """Errors of export, generate and chat on ``run`` (each must refuse it)."""
    errors = []
    calls = [
        lambda: main(["export", str(run), "--ckpt", "last", "--format", "merged", "--out", str(tmp_path / "out")]),
        lambda: generate_command([str(run), "--ckpt", "last", "--prompt", "hi"]),
        lambda: chat_command([str(run), "--ckpt", "last"], stdin=io.StringIO("hi\n")),
    ]
    for call in calls:
        assert call() == 2
        errors.append(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()
    return errors


def test_a_run_naming_popen_is_refused(run, tmp_path, capsys):
    _name_class(run, "subprocess.Popen")
    for err in _every_entry_point(run, tmp_path, capsys):
        assert "model.class_path 'subprocess.Popen' is not one of the toolkit's tasks" in err, err
        assert "finetune.tasks.CausalLM" in err  # what is allowed is named


def test_a_run_naming_a_module_of_its_own_never_imports_it(run, tmp_path, capsys, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "mods").mkdir()
    (tmp_path / "mods" / "sneaky_task.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom finetune.tasks import CausalLM as Task\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    _name_class(run, "sneaky_task.Task")
    for err in _every_entry_point(run, tmp_path, capsys):
        assert "model.class_path 'sneaky_task.Task' is not one of the toolkit's tasks" in err, err
    assert not marker.exists() and "sneaky_task" not in sys.modules


def _edit_hparams(run, **changes) -> None:
    ckpt = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    checkpoint["hyper_parameters"].update(changes)
    torch.save(checkpoint, ckpt)


def test_a_class_path_inside_the_hyperparameters_is_refused(run, tmp_path):
    marker = tmp_path / "ran"
    _edit_hparams(run, adapter={"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}})
    with pytest.raises(ValueError, match=r"last.ckpt: hyper_parameters.adapter: names class_path 'subprocess.Popen'"):
        load_run(run, "last")
    assert not marker.exists()


def test_hyperparameters_that_are_not_constructor_arguments_are_refused(run):
    _edit_hparams(run, on_load="os.system")
    with pytest.raises(ValueError, match=r"last.ckpt: hyper_parameters \['on_load'\] are not arguments of CausalLM"):
        load_run(run, "last")


def test_the_toolkits_own_run_still_loads(run):
    assert type(load_run(run, "last").task).__name__ == "CausalLM"
