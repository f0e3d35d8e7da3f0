"""Tensor parallelism on PyTorch's own machinery (DTensor, ``parallelize_module``), for Lightning's
``ModelParallelStrategy(tensor_parallel_size=N)``.

A family's plan is data: its ``Family.tensor_parallel`` names leaf modules (HF's names: ``q_proj``, ``c_attn``, ...)
and the style each is sharded with; every module with such a leaf name gets that style. Megatron's split: the input
projections (q/k/v, gate/up, ``c_attn``, ``c_fc``) by output features, so each rank holds its own heads and hidden
units, and the output projections (o/down, ``c_proj``) by input features, whose partial sums one all-reduce adds up;
embedding and head by vocabulary, as PyTorch's TP examples shard them. Attention then runs on the local heads
(``Attention.n_heads``/``n_kv_heads`` are set to the per-rank counts, so reshapes and KV caches follow them).
The plan is applied before ``fully_shard``, so TP x FSDP2 (2D) composes on the strategy's 2D mesh.
"""

from torch import nn
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from finetune.models.base import Backbone
from finetune.models.hub import FAMILIES, _family_of_model
from finetune.nn import Attention


def tensor_parallel_size(mesh) -> int:
    """The size of the ``tensor_parallel`` dimension of ``ModelParallelStrategy``'s mesh (1 without a mesh)."""
    if mesh is None or "tensor_parallel" not in (mesh.mesh_dim_names or ()):
        return 1
    return mesh["tensor_parallel"].size()


class FusedColwiseParallel(ColwiseParallel):
    """A fused projection whose output is ``parts`` equal blocks ([q; k; v] of GPT-2's ``c_attn``), split by heads:
    each rank takes its slice of every block, (B, T, parts * F) -> (B, T, parts * F / N) = [q_r | k_r | v_r], so its
    output splits into its own q, k and v heads, as after column-wise q/k/v projections.

    The weight itself stays whole (replicated on the tensor-parallel ranks): a rank's rows of a fused weight are not
    one contiguous block ([q_r; k_r; v_r]), which distributed checkpoints cannot store. Backward all-gathers the
    output gradient, so every rank computes the same full weight gradient."""

    def __init__(self, *, parts: int) -> None:
        super().__init__()
        self.parts = parts

    def _partition_linear_fn(self, name, module, device_mesh):
        for key, param in list(module.named_parameters(recurse=False)):
            dist = nn.Parameter(distribute_tensor(param, device_mesh, [Replicate()]), requires_grad=param.requires_grad)
            module.register_parameter(key, dist)

    def _prepare_output_fn(self, output_layouts, use_local_output, mod, outputs, device_mesh):
        n = device_mesh.size()
        *lead, width = outputs.shape  # (B, T, parts * F), replicated
        blocks = outputs.view(*lead, self.parts, n, width // (self.parts * n))  # (B, T, parts, N, F / N)
        local = blocks.redistribute(device_mesh, [Shard(len(lead) + 1)]).to_local()  # (B, T, parts, 1, F / N)
        return local.flatten(-3)  # (B, T, parts * F / N)


# Style name (as family records write it) -> a fresh ParallelStyle.
STYLES = {
    "colwise": ColwiseParallel,
    "rowwise": RowwiseParallel,
    "colwise_qkv": lambda: FusedColwiseParallel(parts=3),
    # Vocabulary-sharded table: each rank looks up the ids it holds, one all-reduce sums the rows.
    "embedding": lambda: RowwiseParallel(input_layouts=Replicate()),
    # Vocabulary-sharded output head; the logits are gathered whole for the loss and for sampling.
    "head": lambda: ColwiseParallel(output_layouts=Replicate()),
}


def refuse_reason(model: nn.Module, size: int, *, adapter: bool) -> str | None:
    """Why ``model`` cannot be split over ``size`` tensor-parallel ranks, or ``None`` when its family's plan
    applies."""
    planned = sorted({t for f in FAMILIES if f.tensor_parallel for t in f.model_types})
    if not isinstance(model, Backbone):
        return f"the hf backend has no tensor-parallel plan; use model.backend=scratch (model types {planned})"
    family = _family_of_model(model)
    if not family.tensor_parallel:
        return f"model_type {family.model_types[0]!r} has no tensor-parallel plan yet (plans: {planned})"
    if adapter:
        return "an adapter (LoRA) on a tensor-parallel base is not supported yet: its layers are not sharded to match"
    fused = [k for k, v in family.tensor_parallel.items() if v == "colwise_qkv"]
    for name, m in model.named_modules():
        if not isinstance(m, Attention):
            continue
        if m.n_heads % size or m.n_kv_heads % size:
            return f"{name}: {m.n_heads} query and {m.n_kv_heads} key/value heads do not divide into {size} ranks"
        if m.names.qkv in fused and m.n_kv_heads != m.n_heads:
            return f"{name}: a fused {m.names.qkv} is split into equal q/k/v parts; it has grouped key/value heads"
    return None


def apply_tensor_parallel(model: nn.Module, mesh, *, adapter: bool = False) -> bool:
    """Shards ``model`` in place over the mesh's ``tensor_parallel`` dimension by its family's plan; ``False`` (and
    nothing done) when that dimension has size 1. Raises ``ValueError`` naming why a model cannot be split."""
    size = tensor_parallel_size(mesh)
    if size == 1:
        return False
    reason = refuse_reason(model, size, adapter=adapter)
    if reason is not None:
        raise ValueError(f"trainer.strategy.tensor_parallel_size={size}: {reason}; use data_parallel_size (FSDP2)")
    table = _family_of_model(model).tensor_parallel
    plan = {name: STYLES[table[name.rpartition(".")[2]]]() for name, _ in model.named_modules()
            if name.rpartition(".")[2] in table}  # fmt: skip
    parallelize_module(model, mesh["tensor_parallel"], plan)
    for m in model.modules():
        if isinstance(m, Attention):  # each rank attends with its own heads
            m.n_heads, m.n_kv_heads = m.n_heads // size, m.n_kv_heads // size
    model.tie_weights()  # sharding replaced the parameters: share the (identically sharded) head and embedding again
    return True
