"""The reference precomputed in one pass before training (``reference: precomputed`` without log-prob columns):
it equals the disabled-adapter and frozen-copy references (step 0: ln 2), is cached by data and starting weights
(a second run runs no reference forward; a changed row or weight recomputes), and full fine-tuning holds one model."""

import math
import shutil

import lightning.pytorch as L
import pytest
import torch
import transformers

from finetune.data import DataModule
from finetune.tasks import Preference
from tests.tasks.helpers import write_jsonl
from tests.tasks.test_preference import LORA, PAIRS, _batch, _task

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def reference_forwards(monkeypatch):
    """Counts the no-grad ``sequence_logps`` calls (reference forwards; these runs have no validation)."""
    calls = []
    plain = Preference.sequence_logps

    def counted(self, batch, model=None):
        if not torch.is_grad_enabled():
            calls.append(batch["input_ids"].size(0) // 2)
        return plain(self, batch, model)

    monkeypatch.setattr(Preference, "sequence_logps", counted)
    return calls


def _fit(folder, pretrained, rows=PAIRS, cache=None, steps=1, ckpt_path=None, lr=0.0, **model):
    """``steps`` optimizer steps (lr 0: the weights stay) of a precomputed-reference run; returns the task, data."""
    folder.mkdir(parents=True, exist_ok=True)
    task = Preference(str(pretrained), reference="precomputed", lr=lr, schedule="constant", **model)
    dm = DataModule(format="preference", objective="preference", train_files=write_jsonl(folder / "p.jsonl", rows),
                    tokenizer=task.tokenizer, batch_size=len(rows), eval_batch_size=3,
                    cache_dir=str(cache or folder / "cache"))  # fmt: skip
    quiet = {"enable_progress_bar": False, "enable_model_summary": False, "enable_checkpointing": False}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, default_root_dir=str(folder),
                        **quiet)  # fmt: skip
    trainer.fit(task, dm, ckpt_path=ckpt_path)
    trainer.save_checkpoint(folder / "last.ckpt")
    return task, dm


def _train_batch(dm):
    data, collate = dm.fit_splits()["train"]
    return collate(data.__getitems__(list(range(len(data)))))  # the file's order, with the attached columns


@pytest.mark.parametrize("backend", ["scratch", "hf"])
def test_precomputed_pass_equals_adapter_and_copy_references(stand_in, tmp_path, backend, reference_forwards):
    task, dm = _fit(tmp_path / "pre", stand_in("llama"), backend=backend, adapter=LORA)
    assert sum(reference_forwards) == len(PAIRS) and len(reference_forwards) == 2  # eval_batch_size 3: 3 + 1 rows
    batch = _train_batch(dm)
    computed = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])  # (2B,) float64
    adapter = _task(stand_in, backend, adapter=LORA)
    frozen = _task(stand_in, backend, reference="copy")
    plain = _batch(adapter, tmp_path / "plain")
    torch.testing.assert_close(computed.float(), adapter.reference_logps(plain), atol=1e-6, rtol=0)
    torch.testing.assert_close(computed.float(), frozen.reference_logps(plain), atol=1e-6, rtol=0)
    out = task.step(batch, "train", 0)
    assert out["loss"].item() == pytest.approx(math.log(2), abs=1e-6)
    assert out["rewards_chosen"].abs().max() < 1e-6 and out["rewards_rejected"].abs().max() < 1e-6


def test_cache_is_hit_and_invalidated_by_rows_and_weights(stand_in, tmp_path, reference_forwards):
    cache = tmp_path / "cache"
    _, dm = _fit(tmp_path / "a", stand_in("llama"), cache=cache)
    first = _train_batch(dm)["ref_chosen_logps"]
    assert sum(reference_forwards) == len(PAIRS)
    entries = list((cache / "reference-logps").iterdir())
    assert len(entries) == 1 and (entries[0] / "logps.safetensors").is_file()

    reference_forwards.clear()  # the same data and model in a new run: read, no forward
    _, dm = _fit(tmp_path / "b", stand_in("llama"), cache=cache)
    assert reference_forwards == []
    torch.testing.assert_close(_train_batch(dm)["ref_chosen_logps"], first, rtol=0, atol=0)

    changed = [dict(PAIRS[0], chosen=PAIRS[0]["chosen"] + " dog"), *PAIRS[1:]]  # one row changed
    _fit(tmp_path / "c", stand_in("llama"), rows=changed, cache=cache)
    assert sum(reference_forwards) == len(PAIRS)

    reference_forwards.clear()  # one weight changed: a new model
    other = tmp_path / "other"
    shutil.copytree(stand_in("llama"), other)
    hf = transformers.AutoModelForCausalLM.from_pretrained(other)
    with torch.no_grad():
        hf.model.norm.weight[0] += 0.5
    hf.save_pretrained(other)
    _, dm = _fit(tmp_path / "d", other, cache=cache)
    assert sum(reference_forwards) == len(PAIRS)
    assert not torch.allclose(_train_batch(dm)["ref_chosen_logps"], first)
    assert len(list((cache / "reference-logps").iterdir())) == 3


def test_full_fine_tuning_holds_one_model(stand_in, tmp_path, reference_forwards):
    """Without an adapter the pass runs the starting weights themselves: no frozen copy is held, and the
    precomputed values equal a frozen copy's."""
    task, dm = _fit(tmp_path / "full", stand_in("llama"))
    assert task._frozen == []
    fresh = Preference(str(stand_in("llama")))
    fresh.configure_model()
    assert sum(p.numel() for p in task.parameters()) == sum(p.numel() for p in fresh.model.parameters())
    batch = _train_batch(dm)
    copy = _task(stand_in, reference="copy")
    expected = copy.reference_logps(_batch(copy, tmp_path / "plain"))
    torch.testing.assert_close(torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float(), expected,
                               atol=1e-6, rtol=0)  # fmt: skip
    assert task.step(batch, "train", 0)["loss"].item() == pytest.approx(math.log(2), abs=1e-6)


def test_resumed_full_fine_tuning_reads_the_cache(stand_in, tmp_path, reference_forwards):
    """A resumed run's weights are trained: it reads the starting weights' cache entry (keyed before the checkpoint
    is loaded), and refuses, naming the entry, when the cache is gone."""
    cache = tmp_path / "cache"
    _, dm = _fit(tmp_path / "run", stand_in("llama"), cache=cache, lr=1e-2)
    first = _train_batch(dm)["ref_rejected_logps"]
    reference_forwards.clear()
    task, dm = _fit(tmp_path / "run", stand_in("llama"), cache=cache, lr=1e-2, steps=2,
                    ckpt_path=tmp_path / "run/last.ckpt")  # fmt: skip
    assert reference_forwards == [] and task.global_step == 2
    torch.testing.assert_close(_train_batch(dm)["ref_rejected_logps"], first, rtol=0, atol=0)
    shutil.rmtree(cache / "reference-logps")
    with pytest.raises(
        ValueError, match=r"cached reference log-probs of the train split \(.*reference-logps/.*\) are gone"
    ):
        _fit(tmp_path / "run", stand_in("llama"), cache=cache, lr=1e-2, steps=3, ckpt_path=tmp_path / "run/last.ckpt")


@pytest.mark.slow
def test_ddp_pass_shares_rows_and_gathers_them_in_order(stand_in, tmp_path):
    """2 DDP processes, 5 pairs: each computes its strided share (3 and 2 rows, the last repeated), rank 0 writes
    the gathered values, in the file's order: those of one process's frozen copy."""
    from safetensors.torch import load_file

    from tests.tasks.helpers import logged, recipe
    from tests.tasks.test_strategies import DDP, run_cli

    rows = [{**r, "prompt": r["prompt"] + f" {i}"} for i, r in enumerate([*PAIRS, PAIRS[0]])]
    config = recipe(
        tmp_path, "Preference",
        {"pretrained": str(stand_in("llama")), "reference": "precomputed", "lr": 1e-2, "max_new_tokens": 1},
        {"format": "preference", "train_files": write_jsonl(tmp_path / "p.jsonl", rows), "batch_size": 2,
         "eval_batch_size": 2},
        trainer={"max_steps": 1},
    )  # fmt: skip
    run_cli("fit", "--config", config, *DDP)
    assert logged(tmp_path / "run", "train/loss_step")[0] == pytest.approx(math.log(2), abs=1e-6)
    (entry,) = (tmp_path / "cache" / "reference-logps").iterdir()
    cached = load_file(entry / "logps.safetensors")
    copy = _task(stand_in, reference="copy")
    expected = copy.reference_logps(_batch(copy, tmp_path / "plain", rows))  # (2B,) chosen, then rejected
    B = len(rows)
    torch.testing.assert_close(cached["chosen"].float(), expected[:B], atol=1e-6, rtol=0)
    torch.testing.assert_close(cached["rejected"].float(), expected[B:], atol=1e-6, rtol=0)
