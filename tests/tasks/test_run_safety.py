"""Run folders and checkpoints that cannot silently go wrong: checkpoints load as tensors and plain data only (a
pickled payload is refused, by path or URL), a copied run resumes into its own files, ``--ckpt_path last`` needs a
checkpoint, and a fit that fails before its first checkpoint leaves nothing behind."""

import http.server
import os
import shutil
import subprocess
import sys
import threading
from functools import partial

import pytest
import torch

from finetune.cli import main
from finetune.sharded import read_sharded_checkpoint
from tests.tasks.helpers import TINY_LLAMA, cli_error, cyclic_text, fit, recipe, weights, write_jsonl

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _recipe(tmp_path, tokenizer_folder, **trainer) -> str:
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(16, length=10))
    return recipe(
        tmp_path, "CausalLM", {"config": TINY_LLAMA, "tokenizer": str(tokenizer_folder("llama")), "lr": 3e-3},
        {"format": "text", "train_files": data, "validation_files": data, "batch_size": 4, "max_length": 32},
        trainer={"max_steps": 4, "val_check_interval": 2, "limit_val_batches": 1, **trainer},
    )  # fmt: skip


class Payload:
    """Unpickling this runs ``touch MARKER``."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def served(tmp_path):
    """An HTTP server on loopback (ephemeral port) serving ``tmp_path/www``; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_checkpoint_with_a_pickled_payload_is_refused_by_path_and_by_url(
    tmp_path, tokenizer_folder, served, capsys, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # where torch.hub keeps downloads
    config = _recipe(tmp_path, tokenizer_folder)
    root, url = served
    marker = tmp_path / "payload-ran"
    torch.save({"state_dict": {}, "global_step": 0, "x": Payload(marker)}, root / "evil.ckpt")
    for command in ("fit", "validate"):
        for ckpt in (str(root / "evil.ckpt"), f"{url}/evil.ckpt"):
            err = cli_error(capsys, command, "--config", config, "--ckpt_path", ckpt)
            assert f"checkpoint {ckpt}: refused to load it: it holds objects other than tensors" in err, err
            assert "GLOBAL posix.system" in err
            assert not marker.exists()
    err = cli_error(capsys, "fit", "--config", config, "--ckpt_path", f"{url}/evil.ckpt", "--weights_only", "false")
    assert "weights_only" in err  # not an option
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_copied_run_resumes_into_its_own_checkpoints(tmp_path, tokenizer_folder, capsys):
    config = _recipe(tmp_path, tokenizer_folder)
    fit(config)
    original, copy = tmp_path / "run", tmp_path / "copy"
    shutil.copytree(original, copy)
    before = weights(original / "checkpoints" / "last.ckpt")
    capsys.readouterr()
    fit(config, f"--trainer.default_root_dir={copy}", "--ckpt_path", "last", "--trainer.max_steps=8")
    out = capsys.readouterr().out
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]  # no last-v1
    last = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8
    assert any(not torch.equal(v, before[k]) for k, v in last["state_dict"].items())  # it trained on
    assert torch.load(original / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert f"run folder: {copy}" in out and f"best checkpoint: {copy / 'checkpoints' / 'best.ckpt'}" in out
    assert str(original / "checkpoints") not in out


def test_ckpt_path_last_needs_a_checkpoint(tmp_path, tokenizer_folder, capsys):
    config = _recipe(tmp_path, tokenizer_folder)
    typo = tmp_path / "rnu"
    for command in ("fit", "validate"):
        err = cli_error(
            capsys, command, "--config", config, f"--trainer.default_root_dir={typo}", "--ckpt_path", "last"
        )
        assert f"--ckpt_path last: nothing to load: {typo / 'checkpoints' / 'last.ckpt'} does not exist" in err
    assert not typo.exists()


def test_a_failed_fit_leaves_nothing_behind(tmp_path, stand_in, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", cyclic_text(4))
    config = recipe(tmp_path, "CausalLM", {"pretrained": str(stand_in("gpt2"))},
                    {"format": "text", "train_files": data, "max_length": 128})  # fmt: skip  # fails in configure_model
    run = tmp_path / "run"
    assert "exceeds the model's context" in cli_error(capsys, "fit", "--config", config)
    assert not run.exists()
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert "exceeds the model's context" in cli_error(capsys, "fit", "--config", config)
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # what was there stays; only that


def test_a_truncated_last_checkpoint_is_named_with_the_best_one(tmp_path, tokenizer_folder, capsys):
    config = _recipe(tmp_path, tokenizer_folder)
    fit(config)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    err = cli_error(capsys, "fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps=6")
    assert f"checkpoint {last} is unreadable (truncated or corrupt?)" in err
    assert f"other checkpoints of the run: {last.with_name('best.ckpt')}" in err


def test_a_copied_runs_config_writes_into_the_copy(tmp_path, tokenizer_folder, capsys):
    """``fit --config COPY/config.yaml`` resumes into COPY, though the saved config names the original folder."""
    fit(_recipe(tmp_path, tokenizer_folder))
    original, copy = tmp_path / "run", tmp_path / "copy"
    shutil.copytree(original, copy)
    before = {p.name: p.read_bytes() for p in (original / "checkpoints").iterdir()}
    config_before = (original / "config.yaml").read_bytes()
    capsys.readouterr()
    fit(str(copy / "config.yaml"), "--ckpt_path", "last", "--trainer.max_steps=6")
    assert f"run folder: {copy}" in capsys.readouterr().out
    assert torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert {p.name: p.read_bytes() for p in (original / "checkpoints").iterdir()} == before  # untouched
    assert (original / "config.yaml").read_bytes() == config_before


@pytest.mark.parametrize("command", ["validate", "test", "predict"])
def test_only_fit_writes_the_runs_config(tmp_path, tokenizer_folder, command):
    """``validate``/``test``/``predict`` on a run (its own config plus overrides) leave its config.yaml as the fit
    wrote it."""
    fit(_recipe(tmp_path, tokenizer_folder))
    run = tmp_path / "run"
    saved = (run / "config.yaml").read_bytes()
    files = write_jsonl(tmp_path / "p.jsonl", [{"text": "the quick"}])
    extra = {
        "validate": [],
        "test": [f"--data.test_files={files}"],
        "predict": [f"--data.predict_files={files}", "--model.max_new_tokens=4"],
    }
    args = [command, "--debug", "--config", str(run / "config.yaml"), "--ckpt_path", "last", "--model.lr=0.5"]
    assert main([*args, *extra[command]]) == 0
    assert (run / "config.yaml").read_bytes() == saved


FSDP2_ONE_PROCESS = (
    "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
    "--trainer.strategy.data_parallel_size=1", "--trainer.strategy.tensor_parallel_size=1",
    "--trainer.devices=1", "--trainer.accelerator=cpu",
)  # fmt: skip
# ``finetune ARGS`` whose distributed checkpoint saves write one shard file and then fail (a full disk, a kill).
FAILING_SAVE = """
import sys
import lightning.pytorch.strategies.model_parallel as mp
from finetune.cli import main

def half_written(state, path):
    (path / "__0_0.distcp").write_bytes(b"half a shard")
    raise OSError("injected: the disk is full")

mp._distributed_checkpoint_save = half_written
sys.exit(main(sys.argv[1:]))
"""


def test_a_failed_distributed_checkpoint_save_leaves_the_last_one_whole(tmp_path, tokenizer_folder):
    """FSDP2's checkpoint folders are written beside the old ones and swapped in: a save that fails midway leaves
    the previous folders whole and loadable, and the next save leaves no temporary folders."""
    config = _recipe(tmp_path, tokenizer_folder, max_steps=2, val_check_interval=2)
    command = [sys.executable, "-m", "finetune.cli", "fit", "--config", config, *FSDP2_ONE_PROCESS]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    checkpoints = tmp_path / "run" / "checkpoints"
    last = checkpoints / "last.ckpt"
    files = lambda: {str(p.relative_to(checkpoints)): p.read_bytes() for p in checkpoints.rglob("*") if p.is_file()}  # noqa: E731
    before = files()
    resume = ["--ckpt_path", "last", "--trainer.max_steps=4"]
    failed = subprocess.run([sys.executable, "-c", FAILING_SAVE, *command[3:], *resume], capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert failed.returncode != 0 and "injected: the disk is full" in failed.stderr, failed.stderr
    assert files() == before  # the last good checkpoints (best.ckpt/ fails first, at step 4's validation), whole
    assert (
        read_sharded_checkpoint(last)["global_step"]
        == read_sharded_checkpoint(checkpoints / "best.ckpt")["global_step"]
        == 2
    )
    subprocess.run([*command, *resume], check=True, capture_output=True, timeout=300)
    assert read_sharded_checkpoint(last)["global_step"] == 4
    assert sorted(p.name for p in checkpoints.iterdir()) == ["best.ckpt", "last.ckpt"]  # no temporary leftovers
