"""Data order: seeded shuffling per epoch, rank shards, exact eval shards, and mid-epoch resume."""

import json
from types import SimpleNamespace

import lightning.pytorch as L
import pytest
import torch

from finetune.data.sampling import EvalSampler, ResumableDataLoader, TrainSampler


def test_train_order_is_seeded_per_epoch():
    s = TrainSampler(50, seed=3)
    first = list(s)
    assert sorted(first) == list(range(50)) and list(TrainSampler(50, seed=3)) == first
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == list(range(50)) and second != first
    other = TrainSampler(50, seed=4)  # seed + epoch
    assert list(other) == second and list(TrainSampler(50, seed=5)) != first


@pytest.mark.parametrize("size, replicas", [(10, 3), (12, 4), (2, 3)])
def test_train_shards_are_equal_disjoint_and_covering(size, replicas):
    shards = [list(TrainSampler(size, seed=1, num_replicas=replicas, rank=r)) for r in range(replicas)]
    per_rank = -(-size // replicas)
    assert all(len(s) == per_rank for s in shards)  # every rank gets as many batches
    everything = [i for s in shards for i in s]
    assert set(everything) == set(range(size))
    assert len(everything) - size == per_rank * replicas - size  # only the wrap-around padding repeats


def test_eval_shards_hold_each_row_exactly_once():
    shards = [list(EvalSampler(10, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    assert sorted(i for s in shards for i in s) == list(range(10))
    assert list(EvalSampler(5)) == list(range(5))
    with pytest.raises(ValueError, match=r"rank 3 is not in \[0, num_replicas=3\)"):
        EvalSampler(5, num_replicas=3, rank=3)


class Recording(torch.utils.data.Dataset):
    """range(n), remembering which indices were loaded."""

    def __init__(self, n):
        self.n, self.loaded = n, []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.loaded.append(i)
        return i


def loader(data, epoch=0):
    sampler = TrainSampler(len(data), seed=7)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(data, batch_size=3, sampler=sampler, collate_fn=list)


def test_resume_continues_with_the_remaining_batches_without_loading_the_skipped():
    full = list(loader(Recording(20), epoch=2))
    assert len(full) == 7
    first = loader(Recording(20), epoch=2)
    it = iter(first)
    seen = [next(it) for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 3} and seen == full[:3]
    data = Recording(20)
    resumed = loader(data, epoch=2)
    resumed.load_state_dict(state)
    assert list(resumed) == full[3:]
    assert sorted(data.loaded) == sorted(i for b in full[3:] for i in b)  # skipped samples never loaded
    assert resumed.state_dict() == {"epoch": 2, "batches_yielded": 7}
    assert list(resumed) == full  # the skip applies once
    other_epoch = loader(Recording(20), epoch=3)
    other_epoch.load_state_dict(state)  # a state of another epoch skips nothing
    assert len(list(other_epoch)) == 7


def test_datamodule_shards_by_the_trainer_strategy(make_dm, write):
    path = write("train.jsonl", [{"text": f"row {i}"} for i in range(5)])

    def on_rank(rank, **kwargs):
        dm = make_dm(train_files=path, predict_files=path, batch_size=2, eval_batch_size=2, **kwargs)
        dm.trainer = SimpleNamespace(
            strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2, "rank": rank})
        )
        return dm

    predicted = [[i for b in on_rank(r).predict_dataloader() for i in b["row"].tolist()] for r in range(2)]
    assert predicted == [[0, 2, 4], [1, 3]]  # exact: no padding, no duplicates
    train = [list(on_rank(r).train_dataloader()) for r in range(2)]
    assert len(train[0]) == len(train[1]) == 2  # 3 rows per rank (one wrapped around) in batches of 2
    assert on_rank(0).train_dataloader().sampler.seed == 0 and on_rank(0, seed=5).train_dataloader().sampler.seed == 5


class Recorder(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["input_ids"].tolist()))
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_resumes_mid_epoch_with_the_same_order(make_dm, tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": "the cat " + "a " * i}) + "\n" for i in range(10)))

    def fit(ckpt_path=None, callbacks=()):
        model = Recorder()
        trainer = L.Trainer(
            max_epochs=2,
            use_distributed_sampler=False,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
            callbacks=list(callbacks),
        )
        trainer.fit(model, make_dm(train_files=str(path), batch_size=3), ckpt_path=ckpt_path)
        return model.seen

    every_2 = L.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    full = fit(callbacks=[every_2])
    assert [e for e, _ in full] == [0] * 4 + [1] * 4 and full[:4] != full[4:]
    assert fit(tmp_path / "ckpt" / "epoch=0-step=2.ckpt") == full[2:]  # mid epoch 0
    assert fit(tmp_path / "ckpt" / "epoch=1-step=6.ckpt") == full[6:]  # mid epoch 1
