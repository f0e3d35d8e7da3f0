"""``finetune attention``: the attention weights of a from-scratch model on one prompt, as PNG heat maps (one
figure per layer, a panel per head, tokens on both axes) and the raw weights as ``.npz``.

The weights come from ``nn.attention.explicit_attention``, switched on per layer only while maps are recorded;
everywhere else attention runs through SDPA.
"""

from contextlib import contextmanager
from pathlib import Path

import torch

from finetune.nn import Attention


def attention_layers(model) -> list[Attention]:
    """The self-attention of each block (decoders and BERT; T5's encoder-decoder stacks are not covered)."""
    layers = [getattr(layer, "attn", None) for layer in getattr(model, "layers", ())]
    if model.is_encoder_decoder or not layers or not all(isinstance(a, Attention) for a in layers):
        raise ValueError(f"attention maps: {type(model).__name__} is not a model with one self-attention per block")
    return layers


@contextmanager
def keeping_weights(modules: list[Attention]):
    for m in modules:
        m.keep_weights, m.weights = True, None
    try:
        yield
    finally:
        for m in modules:
            m.keep_weights = False


def attention_maps(model, input_ids: torch.Tensor, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """{layer: weights (H, T, T)} of one sequence ``input_ids`` (1, T), for ``layers`` (default: all)."""
    blocks = attention_layers(model)
    chosen = list(range(len(blocks))) if layers is None else layers
    if bad := [i for i in chosen if not 0 <= i < len(blocks)]:
        raise ValueError(f"--layers {bad}: the model has layers 0..{len(blocks) - 1}")
    picked = [blocks[i] for i in chosen]
    with keeping_weights(picked), torch.no_grad():
        model(input_ids)
        return {i: m.weights[0].cpu() for i, m in zip(chosen, picked, strict=True)}


def plot_layer(weights: torch.Tensor, tokens: list[str], title: str, path: Path) -> None:
    """One figure: a heat map per head, queries down, keys across, token strings on the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, T = weights.shape[0], weights.shape[-1]
    cols = min(H, 4)
    rows = -(-H // cols)
    side = max(2.5, 0.25 * T)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols, side * rows), squeeze=False)
    for h, ax in enumerate(axes.flat):
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(weights[h].numpy(), vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"head {h}", fontsize=8)
        ax.set_xticks(range(T), tokens, rotation=90, fontsize=6)
        ax.set_yticks(range(T), tokens, fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_maps(loaded, prompt: str, out_dir, *, layers: list[int] | None = None, overwrite: bool = False) -> Path:
    """``out_dir``: ``layer_{i}.png`` per layer and ``attention.npz`` (``layer_{i}``: (H, T, T) float32, ``tokens``,
    ``input_ids``); written beside it and renamed at the end."""
    import numpy as np

    from finetune.folders import atomic_folder

    ids = loaded.encode(prompt)
    if not ids:
        raise ValueError("--prompt: encodes to no tokens")
    device = next(loaded.model.parameters()).device
    maps = attention_maps(loaded.model, torch.tensor([ids], device=device), layers)
    tokens = [loaded.tokenizer.decode([i]) for i in ids]
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        arrays = {f"layer_{i}": w.numpy().astype(np.float32) for i, w in maps.items()}
        np.savez(tmp / "attention.npz", tokens=np.array(tokens), input_ids=np.array(ids), **arrays)
        for i, w in maps.items():
            plot_layer(w, tokens, f"{Path(loaded.source).name}: layer {i}", tmp / f"layer_{i}.png")
    return Path(out_dir)
