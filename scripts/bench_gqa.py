"""SDPA with grouped KV heads, forward + backward: ``enable_gqa`` against K/V repeated to every query head.

    python scripts/bench_gqa.py                 # CPU, the bench_train shapes (8 heads, 4 KV heads, 256 tokens)
    options: --batch 8 --heads 8 --kv-heads 4 --seq 256 --head-dim 32 --rounds 12 --threads (all) --device cpu

finetune.nn.Attention passes ``enable_gqa`` for unmasked calls (training on unpadded rows) and repeats K/V when a
mask is present (see its comment); this measures both paths, taking turns call by call (a, b, a, b, ...) so that
a slow spell of a shared machine hits both alike, and prints min and median milliseconds and their ratio.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def attention(q, k, v, mask, repeat: bool) -> torch.Tensor:
    if repeat:
        r = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # (B, H, T, D)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("batch", 8), ("heads", 8), ("kv-heads", 4), ("seq", 256), ("head-dim", 32), ("rounds", 12)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    B, H, Hkv, T, D = a.batch, a.heads, a.kv_heads, a.seq, a.head_dim
    print("| dtype | mask | enable_gqa ms (min / median) | repeated K/V ms (min / median) | repeat / gqa (median) |")
    print("| --- | --- | --- | --- | --- |")
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        q0, k0, v0 = (torch.randn(B, h, T, D, generator=g).to(a.device, dtype) for h in (H, Hkv, Hkv))
        grad = torch.randn(B, H, T, D, generator=g).to(a.device, dtype)
        seg = (torch.arange(T) >= T // 3).long() + 1  # two packed samples per row
        packed = torch.tril(torch.ones(T, T, dtype=torch.bool)) & (seg[:, None] == seg[None, :])
        for mask in (None, packed[None, None].to(a.device)):
            times = {False: [], True: []}
            for _ in range(a.rounds):
                for repeat in (False, True):
                    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
                    t0 = time.perf_counter()
                    attention(q, k, v, mask, repeat).backward(grad)
                    if a.device == "cuda":
                        torch.cuda.synchronize()
                    times[repeat].append((time.perf_counter() - t0) * 1e3)
            med = {r: statistics.median(t) for r, t in times.items()}
            cells = [f"{min(times[r]):.1f} / {med[r]:.1f}" for r in (False, True)]
            name = str(dtype).removeprefix("torch.")
            print(f"| {name} | {'packed' if mask is not None else 'causal'} | {cells[0]} | {cells[1]} | "
                  f"{med[True] / med[False]:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
