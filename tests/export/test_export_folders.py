"""Where ``finetune export`` writes: ``--force`` replaces only an earlier export and never the run, the current
directory or $HOME; a killed export's temporary folder is removed by the next one; exported files are readable by
other users (0644 / 0755 under umask 022)."""

import os
import shutil
import socket
import stat
import subprocess
import sys

import pytest
import transformers as T

from finetune.cli import main
from finetune.export import export
from finetune.folders import MARKER
from tests.export.test_export_errors import trained  # noqa: F401 (the module's LoRA run fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def run(tmp_path, trained):  # noqa: F811
    """A copy of the trained run in ``tmp_path/runs/run``, beside a sibling run (which --force must not touch)."""
    copy = tmp_path / "runs" / "run"
    shutil.copytree(trained[0], copy)
    (tmp_path / "runs" / "sibling").mkdir()
    (tmp_path / "runs" / "sibling" / "keep.txt").write_text("mine")
    return copy


def _files(folder) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _an_export_marker(folder) -> None:
    """Makes ``folder`` look like an earlier export, so only the location rule can refuse it."""
    (folder / MARKER).write_text("{}\n")


def _refused(capsys, run, out, message: str) -> None:
    code = main(["export", str(run), "--format", "adapter", "--ckpt", "last", "--out", str(out), "--force"])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_force_never_replaces_the_run_or_a_folder_holding_it(run, tmp_path, capsys):
    before = _files(tmp_path)
    _refused(capsys, run, run, f"{run}: is {run}, which this export reads from")
    _an_export_marker(tmp_path / "runs")
    _refused(capsys, run, tmp_path / "runs", f"{tmp_path / 'runs'}: contains {run}, which this export reads from")
    _refused(capsys, run, run / "checkpoints", "checkpoints: lies inside")
    assert _files(tmp_path) == sorted([*before, f"runs/{MARKER}"])  # nothing deleted, nothing left beside


def test_force_never_replaces_the_current_directory_or_home(run, tmp_path, capsys, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    _an_export_marker(here)
    monkeypatch.chdir(here)
    _refused(capsys, run, ".", f".: is the current directory ({here})")

    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    _an_export_marker(home)
    monkeypatch.setenv("HOME", str(home))
    _refused(capsys, run, home, f"{home}: is $HOME ({home})")
    link = tmp_path / "to-home"
    link.symlink_to(home)
    _refused(capsys, run, link, f"{link}: is $HOME ({home})")  # symlinks resolved
    assert (home / ".bashrc").read_text() == "mine" and (here / "notes.txt").read_text() == "mine"
    assert (tmp_path / "runs" / "sibling" / "keep.txt").read_text() == "mine"


def test_force_replaces_an_earlier_export_only(run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("mine")
    _refused(capsys, run, mine, f"{mine}: exists, is not empty and is not an earlier export (it has no {MARKER}")
    assert _files(mine) == ["thesis.tex"]

    out = tmp_path / "out"
    export(run, out, format="merged", ckpt="last")
    assert (out / MARKER).is_file()
    with pytest.raises(FileExistsError, match="out: exists and is not empty .*pass --force"):
        export(run, out, format="adapter", ckpt="last")
    export(run, out, format="adapter", ckpt="last", force=True)  # the earlier export is replaced
    assert "adapter_config.json" in _files(out) and "model.safetensors" not in _files(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "out", "runs"]  # no temporary or old folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_killed_exports_leftovers_are_removed_and_a_live_ones_kept(run, tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".out.tmp-{host}-{_dead_pid()}-abcd1234"
    dead_old = tmp_path / f".out.old-{host}-{_dead_pid()}-efgh5678"
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-ijkl9012"  # this process: alive
    other_host = tmp_path / f".out.tmp-elsewhere-{_dead_pid()}-mnop3456"  # pid of another machine: unknown
    for leftover in (dead, dead_old, live, other_host):
        leftover.mkdir()
        (leftover / "model.safetensors").write_bytes(b"\0" * 1000)
    export(run, tmp_path / "out", format="merged", ckpt="last")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted([live.name, other_host.name, "out", "runs"])


def test_exported_files_are_readable_by_others(run, tmp_path):
    old = os.umask(0o022)
    try:
        out = export(run, tmp_path / "out", format="adapter", ckpt="last")
    finally:
        os.umask(old)
    paths = [out, *out.rglob("*")]
    assert any(p.is_dir() and p != out for p in paths)  # base/ is checked too
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(os.stat(p).st_mode) for p in paths}
    assert modes == {k: 0o755 if (tmp_path / k).is_dir() else 0o644 for k in modes}
    T.AutoModelForCausalLM.from_pretrained(out / "base")
