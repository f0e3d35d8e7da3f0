"""The frozen-copy reference under FSDP2 (``ModelParallelStrategy``, 2 gloo processes, full fine-tuning): step 0
loss = ln 2, the copy is sharded like the policy (each rank holds its share of it, not the whole model) and its
weights are bitwise unchanged by the steps that move the policy."""

import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.tasks.helpers import logged, recipe, write_jsonl
from tests.tasks.test_preference import PAIRS
from tests.tasks.test_strategies import FSDP2, run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class FrozenCopyCheck(Callback):
    """Writes ``rank<r>.json``: per-rank element counts of the policy and the frozen copy (their local shards),
    whether every copy weight is sharded, and whether the copy's local shards are bitwise those it started with
    and the policy's are not."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        frozen = pl_module._frozen[0]
        self.start = {n: _local(p).detach().clone() for n, p in frozen.named_parameters()}
        self.policy_start = {n: _local(p).detach().clone() for n, p in pl_module.model.named_parameters()}

    def on_train_end(self, trainer, pl_module) -> None:
        frozen, policy = pl_module._frozen[0], pl_module.model
        report = {
            "frozen_local": sum(_local(p).numel() for p in frozen.parameters()),
            "policy_local": sum(_local(p).numel() for p in policy.parameters()),
            "full": sum(p.numel() for p in frozen.parameters()),  # a DTensor's numel is the whole weight's
            "all_sharded": all(hasattr(p, "to_local") for p in frozen.parameters()),
            "frozen_unchanged": all(torch.equal(_local(p), self.start[n]) for n, p in frozen.named_parameters()),
            "policy_moved": any(not torch.equal(_local(p), self.policy_start[n]) for n, p in policy.named_parameters()),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


@pytest.mark.slow
def test_fsdp2_frozen_copy_is_sharded_and_unchanged(tmp_path, stand_in):
    rows = [{**r, "prompt": r["prompt"] + f" {i}"} for i, r in enumerate(PAIRS * 2)]  # 8 pairs: 2 steps of 2 x 2
    check = {
        "class_path": "tests.tasks.test_preference_fsdp2.FrozenCopyCheck",
        "init_args": {"folder": str(tmp_path / "check")},
    }
    config = recipe(
        tmp_path, "Preference",
        {"pretrained": str(stand_in("llama")), "reference": "copy", "lr": 1e-2, "max_new_tokens": 1},
        {"format": "preference", "train_files": write_jsonl(tmp_path / "p.jsonl", rows), "batch_size": 2},
        trainer={"max_steps": 2, "callbacks": [check]},
    )  # fmt: skip
    run_cli("fit", "--config", config, *FSDP2, torchrun=True)
    losses = logged(tmp_path / "run", "train/loss_step")
    assert sorted(losses) == [0, 1] and losses[0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[1] != pytest.approx(math.log(2), abs=1e-4)  # the policy moved away from its reference
    reports = [json.loads((tmp_path / "check" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for report in reports:
        assert report["all_sharded"] and report["frozen_unchanged"] and report["policy_moved"], report
        assert report["frozen_local"] == report["policy_local"] < 0.6 * report["full"], report
    assert sum(r["frozen_local"] for r in reports) == reports[0]["full"]  # the two shards make the whole copy
