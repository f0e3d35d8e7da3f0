"""Tensor parallelism (``ModelParallelStrategy``, gloo on CPU): a 2D run, TP 2 x FSDP2 2 (4 processes), of LLaMA
(grouped-query attention) and a TP 2 x DP 1 run of GPT-2 (fused ``c_attn``, tied head) log the 1-process loss at
every step, end with the same weights and generate the same sample; models without a plan, and adapters, are
refused. (GPT-2 runs on 2 processes only, to keep to two multi-process runs; both go through ``fully_shard`` after
the plan, over a data-parallel dimension of 2 or 1.)"""

import json
import re
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tests.tasks.helpers import cyclic_text, fit, logged, recipe, weights, write_jsonl
from tests.tasks.test_strategies import run_cli

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

STEPS = 3
BATCH = 4  # rows per step, of all data-parallel ranks together


def _strategy(dp: int, tp: int) -> tuple[str, ...]:
    return (
        "--trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy",
        f"--trainer.strategy.data_parallel_size={dp}",
        f"--trainer.strategy.tensor_parallel_size={tp}",
        f"--trainer.devices={dp * tp}",
        "--trainer.accelerator=cpu",
        f"--data.batch_size={BATCH // dp}",
    )


DP = {"llama": 2, "gpt2": 1}  # data-parallel size of each family's run with TP 2
NO_DROPOUT = {"gpt2": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, "llama": {}}


# Each tensor-parallel rank holds these rows x columns of the tiny models (vocabulary 320, width 32, MLP 128 / 64,
# 4 heads of 8).
LOCAL_SHAPES = {
    "llama": {"embed_tokens.weight": [160, 32], "lm_head.weight": [160, 32], "layers.0.attn.q_proj.weight": [16, 32],
              "layers.0.attn.k_proj.weight": [8, 32], "layers.0.attn.o_proj.weight": [32, 16],
              "layers.0.mlp.gate_proj.weight": [32, 32], "layers.0.mlp.down_proj.weight": [32, 32],
              "layers.0.attn_norm.weight": [32]},
    "gpt2": {"wte.weight": [160, 32], "layers.0.attn.c_attn.weight": [96, 32],
             "layers.0.attn.c_proj.weight": [32, 16], "layers.0.mlp.c_fc.weight": [64, 32],
             "layers.0.mlp.c_proj.weight": [32, 64], "wpe.weight": [64, 32]},
}  # fmt: skip


class SaveLocalShapes(Callback):
    """Writes ``{parameter: this rank's shape}`` (a DTensor's local shard) and the local attention head counts to
    ``{folder}/shapes-{rank}.json`` when training ends: what each rank really holds."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        from torch.distributed.tensor import DTensor

        local = lambda p: p.to_local() if isinstance(p, DTensor) else p  # noqa: E731
        shapes = {n.removeprefix("model."): list(local(p).shape) for n, p in pl_module.named_parameters()}
        heads = [[m.n_heads, m.n_kv_heads] for m in pl_module.modules() if hasattr(m, "n_kv_heads")]
        Path(self.folder, f"shapes-{trainer.global_rank}.json").write_text(json.dumps([shapes, heads]))

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        # The epoch loss's token count, synced (a collective: every rank calls it): tensor-parallel ranks share
        # their rows, so they must count them once.
        loss = pl_module.metrics("train")["train/loss"]
        with loss.sync_context(should_unsync=True):
            tokens = float(loss.weight)
        Path(self.folder, f"tokens-{trainer.global_rank}.json").write_text(json.dumps(tokens))


def _config(folder, stand_in, arch: str, *, callbacks=(), **model) -> str:
    data = write_jsonl(folder / "train.jsonl", cyclic_text(8, length=10))
    return recipe(
        folder, "CausalLM",
        # eps: GPT-2's key biases have zero true gradient (softmax ignores a per-query constant); Adam's default eps
        # would turn their rounding noise, which differs with the summation order, into full steps.
        {"pretrained": str(stand_in(arch)), "config": NO_DROPOUT[arch], "lr": 1e-2, "schedule": "constant", "eps": 1e-4,
         "max_new_tokens": 8, "sample_prompt": "the quick", **model},
        {"format": "text", "train_files": data, "batch_size": BATCH, "max_length": 16},
        trainer={"max_steps": STEPS, "callbacks": list(callbacks)},
    )  # fmt: skip


def _sample(out: str) -> str:
    return re.search(r"^sample: (.*)$", out, re.M).group(1)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tensor_parallel_equals_one_process(arch, tmp_path, stand_in, capsys):
    one, tp = tmp_path / "one", tmp_path / "tp"
    one.mkdir(), tp.mkdir()
    counted = {"class_path": "tests.tasks.test_tensor_parallel.SaveLocalShapes", "init_args": {"folder": str(one)}}
    fit(_config(one, stand_in, arch, callbacks=[counted]))
    one_sample = _sample(capsys.readouterr().out)
    shapes = {"class_path": "tests.tasks.test_tensor_parallel.SaveLocalShapes", "init_args": {"folder": str(tp)}}
    dp = DP[arch]
    config = _config(tp, stand_in, arch, callbacks=[shapes])
    out = run_cli("fit", "--config", config, *_strategy(dp, 2), torchrun=True, processes=2 * dp)
    # Each rank holds its half of every planned layer (and FSDP2 its half of that, by rows) and attends with half
    # the heads.
    expected = {k: [v[0] // dp, *v[1:]] for k, v in LOCAL_SHAPES[arch].items()}
    for rank in range(2 * dp):
        local, heads = json.loads((tp / f"shapes-{rank}.json").read_text())
        assert {k: local[k] for k in expected} == expected
        assert heads == [[2, 1] if arch == "llama" else [2, 2]] * 2
        assert json.loads((tp / f"tokens-{rank}.json").read_text()) == json.loads((one / "tokens-0.json").read_text())

    one_loss, tp_loss = logged(one / "run", "train/loss_step"), logged(tp / "run", "train/loss_step")
    assert sorted(one_loss) == list(range(STEPS)) and len(set(one_loss.values())) == STEPS  # the model learns
    assert tp_loss == pytest.approx(one_loss, rel=0, abs=1e-5)

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(tp / "run" / "checkpoints" / "last.ckpt", tmp_path / "tp.pt")
    tp_weights = torch.load(tmp_path / "tp.pt", weights_only=False)["state_dict"]
    one_weights = weights(one / "run" / "checkpoints" / "last.ckpt")
    assert tp_weights.keys() == one_weights.keys()
    assert all(torch.isfinite(v).all() for v in tp_weights.values())
    differ = {k: (tp_weights[k] - v).abs().max().item() for k, v in one_weights.items()}
    assert max(differ.values()) < 1e-5, {k: d for k, d in differ.items() if d >= 1e-5}
    assert _sample(out) == one_sample  # generated by the sharded model, on both ranks


class _Mesh:
    """Stands in for ``ModelParallelStrategy``'s device mesh: only its tensor-parallel size is read before a
    refusal."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, tp: int) -> None:
        self.tp = tp

    def __getitem__(self, name: str) -> "_Mesh":
        return self

    def size(self) -> int:
        return self.tp


@pytest.mark.parametrize(
    "arch, kwargs, tp, message",
    [
        ("bert", {}, 2, r"model_type 'bert' has no tensor-parallel plan yet \(plans: \['gpt2', 'llama', 'mistral', "
                        r"'qwen2'\]\)"),
        ("llama", {"backend": "hf"}, 2, "the hf backend has no tensor-parallel plan; use model.backend=scratch"),
        ("llama", {"adapter": "lora"}, 2, r"an adapter \(LoRA\) on a tensor-parallel base is not supported"),
        ("llama", {}, 4, "layers.0.attn: 4 query and 2 key/value heads do not divide into 4 ranks"),
    ],
)  # fmt: skip
def test_tensor_parallel_refused(arch, kwargs, tp, message, stand_in):
    """A model without a plan, an adapter, or heads that don't split evenly: ``configure_model`` refuses
    ``tensor_parallel_size > 1`` before sharding anything, naming why (today it would train full replicas)."""
    from finetune.tasks import CausalLM, MaskedLM

    task = (MaskedLM if arch == "bert" else CausalLM)(str(stand_in(arch)), **kwargs)
    task._device_mesh = _Mesh(tp)
    with pytest.raises(ValueError, match=rf"trainer.strategy.tensor_parallel_size={tp}: {message}"):
        task.configure_model()
