"""A tiny decoder trained for a few seconds on a deterministic token map, so its greedy choices have margins (a
random model's near-ties would flip under any rounding), saved as a Hugging Face folder with a tokenizer."""

from contextlib import contextmanager

import torch

from finetune.models.hub import from_config

V = 97


@contextmanager
def one_thread():
    """Tiny models run fastest on one thread (and far faster than on two busy ones, as in CI)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def next_token(ids: torch.Tensor) -> torch.Tensor:
    """The "language": each token fixes the next one."""
    return (ids * 5 + 3) % V


def trained(model_type: str = "llama", *, steps: int = 60, seed: int = 0):
    """Our model of ``model_type`` (hidden 64, 2 layers) trained to follow ``next_token``; eval mode."""
    torch.manual_seed(seed)
    config = (
        dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=0,
             eos_token_id=None)
        if model_type == "llama"
        else dict(model_type="gpt2", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0,
                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=None)
    )  # fmt: skip
    model = from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.empty(8, 24, dtype=torch.long)
        x[:, 0] = torch.randint(0, V, (8,), generator=g)
        for t in range(1, x.size(1)):
            x[:, t] = torch.where(torch.rand(8, generator=g) < 0.1, torch.randint(0, V, (8,), generator=g),
                                  next_token(x[:, t - 1]))  # fmt: skip
        logits = model(x[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
