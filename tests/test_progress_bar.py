"""The training progress bar: the run's bounds in its words, and metrics read from the device only as it logs."""

import lightning.pytorch as L
import torch
from lightning.pytorch.trainer.connectors.logger_connector.logger_connector import _LoggerConnector

from finetune.callbacks import ProgressBar


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        loss = (self.w * batch).pow(2).mean()
        self.log("train/loss_step", loss, prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(tmp_path, monkeypatch, **kwargs):
    """Fits Tiny on 12 one-row batches per epoch; returns (bar, number of reads of the progress-bar metrics)."""
    reads = []
    original = _LoggerConnector.progress_bar_metrics

    def counted(self):
        reads.append(1)
        return original.fget(self)

    monkeypatch.setattr(_LoggerConnector, "progress_bar_metrics", property(counted))
    bar = ProgressBar()
    trainer = L.Trainer(
        callbacks=[bar], logger=False, enable_checkpointing=False, default_root_dir=tmp_path, accelerator="cpu",
        log_every_n_steps=6, enable_model_summary=False, **kwargs,
    )  # fmt: skip
    trainer.fit(Tiny(), torch.utils.data.DataLoader(torch.randn(12, 2), batch_size=1))
    return bar, len(reads)


def test_a_run_bounded_by_steps_shows_its_steps_not_a_negative_epoch(tmp_path, monkeypatch):
    bar, reads = fit(tmp_path, monkeypatch, max_steps=18)
    assert bar.train_progress_bar.desc.startswith("Epoch 2, step 18/18")  # Lightning's rich bar: "Epoch 1/-2"
    assert "train/loss_step" in bar.train_progress_bar.postfix
    assert reads <= 5  # every 6 batches and at epoch ends, not 18 times (Lightning's bar: once per batch)


def test_a_run_bounded_by_epochs_counts_them_from_one(tmp_path, monkeypatch):
    bar, reads = fit(tmp_path, monkeypatch, max_epochs=2)
    assert bar.train_progress_bar.desc.startswith("Epoch 2/2")
    assert reads <= 6
