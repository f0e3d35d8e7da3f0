"""Weight-only int8 / int4 matmul paths at batch 1 (decode), one layer shape at a time: which is fastest on this CPU.

    flock /tmp/finetune-bench.lock python scripts/bench_quant_kernels.py     # the bench model's shapes, 1 and 2 threads
    options: --shapes 512x512,1408x512,512x1408 (N x K: out x in) --threads 1,2 --rounds 5 --iters 200
             --paths fp32,bf16,... (default: all)

Paths, each y = x @ W^T for x (1, K):
  fp32 / bf16            F.linear on the full-precision weight (bf16: input and weight in bf16)
  int8pack / int4pack    aten._weight_int8pack_mm / _weight_int4pack_mm_for_cpu (fp32 input; "-bf16": bf16 input)
  deq int8 / deq int4    eager: the int weight dequantized to fp32 every call, then F.linear
  compiled int8 / int4   torch.compile (inductor, CPU) of the same dequantize + linear: inductor fuses the int8 /
                         nibble unpacking and the scale into the matrix-vector product's loop (the gpt-fast way)
  torchao int8           torchao 0.18 Int8WeightOnlyConfig, eager and torch.compile'd (torchao 0.18 has no CPU
                         int4 weight-only layout: its Int4WeightOnlyConfig formats need CUDA/XPU or mslk)

Times are per call: median over rounds of the mean over ``--iters`` calls; rounds interleave the paths, the spread
is min-max over rounds. GB/s is the weight bytes the path reads per call (int4: packed nibbles + scales and zeros)
over its time: decode at batch 1 reads every weight once per token, so that is how close a path is to memory
bandwidth. Prints a markdown table per thread count.
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from finetune.quant.core import pack_nibbles, quantize_weight

aten = torch.ops.aten


def int8_deq(x, q, scale):  # x (1, K) fp32; q (N, K) int8; scale (N,) -> (1, N)
    return F.linear(x, q.to(x.dtype)) * scale


def int4_deq(x, packed, scale, zero):  # packed (N, K/2) uint8 nibbles, scale / zero (N, G) -> (1, N)
    N, K = packed.size(0), 2 * packed.size(1)
    G = scale.size(1)
    u = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(N, G, K // G)  # (N, G, g) in [0, 15]
    w = (u.to(x.dtype) - 8) * scale[..., None] + zero[..., None]  # (N, G, g)
    return F.linear(x, w.view(N, K))


def paths(N: int, K: int, only: set[str] | None) -> dict:
    """name -> (call, weight bytes read per call)."""
    torch.manual_seed(0)
    w = torch.randn(N, K) * K**-0.5
    x = torch.randn(1, K)
    xb = x.bfloat16()
    out = {"fp32": (lambda: F.linear(x, w), 4 * N * K)}
    wb = w.bfloat16()
    out["bf16"] = (lambda: F.linear(xb, wb), 2 * N * K)
    q8 = quantize_weight(w, bits=8)
    q, s8 = q8.q, q8.scale[:, 0].contiguous()
    b8 = N * K + 4 * N
    out["int8pack"] = (lambda: aten._weight_int8pack_mm(x, q, s8), b8)
    s8b = s8.bfloat16()
    out["int8pack-bf16"] = (lambda: aten._weight_int8pack_mm(xb, q, s8b), b8)
    out["deq int8"] = (lambda: int8_deq(x, q, s8), b8)
    c8 = torch.compile(int8_deq, dynamic=False)
    out["compiled int8"] = (lambda: c8(x, q, s8), b8)
    for g in (32, 128):
        q4 = quantize_weight(w, bits=4, group_size=g, symmetric=False)
        u = (q4.q.to(torch.int32) + 8).contiguous()
        packed = aten._convert_weight_to_int4pack_for_cpu(u, 1)
        sz = torch.stack((q4.scale, q4.zero), -1).transpose(0, 1).contiguous()  # (G, N, 2)
        b4 = N * K // 2 + 8 * q4.scale.numel()
        out[f"int4pack g{g}"] = (lambda p=packed, g=g, sz=sz: aten._weight_int4pack_mm_for_cpu(x, p, g, sz), b4)
        szb = sz.bfloat16()
        out[f"int4pack-bf16 g{g}"] = (lambda p=packed, g=g, sz=szb: aten._weight_int4pack_mm_for_cpu(xb, p, g, sz), b4)
        nib = pack_nibbles(q4.q)  # (N, K / 2) uint8
        sc, ze = q4.scale.contiguous(), q4.zero.contiguous()
        out[f"deq int4 g{g}"] = (lambda n=nib, s=sc, z=ze: int4_deq(x, n, s, z), b4)
        c4 = torch.compile(int4_deq, dynamic=False)
        out[f"compiled int4 g{g}"] = (lambda c=c4, n=nib, s=sc, z=ze: c(x, n, s, z), b4)
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        lin = nn.Linear(K, N, bias=False)
        lin.weight.data.copy_(w)
        quantize_(lin, Int8WeightOnlyConfig())
        out["torchao int8"] = (lambda: lin(x), b8)
        ct = torch.compile(copy.deepcopy(lin), dynamic=False)
        out["torchao int8 compiled"] = (lambda: ct(x), b8)
    except ImportError:
        pass
    return {k: v for k, v in out.items() if only is None or k in only}


@torch.no_grad()
def measure(calls: dict, rounds: int, iters: int) -> dict[str, list[float]]:
    for call, _ in calls.values():  # warm-up: compiles, packs, caches
        for _ in range(5):
            call()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for name, (call, _) in calls.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            times[name].append((time.perf_counter() - t0) / iters * 1e6)  # µs per call
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="512x512,1408x512,512x1408")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--paths", default=None)
    args = p.parse_args()
    only = set(args.paths.split(",")) if args.paths else None
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    t_start = time.perf_counter()
    built = {(N, K): paths(N, K, only) for N, K in shapes}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        print(f"\n{threads} thread(s); µs per call (median of {args.rounds} rounds, min-max), weight GB/s\n")
        print("| path | " + " | ".join(f"{N}x{K} µs | GB/s" for N, K in shapes) + " | vs fp32 (sum) |")
        print("|---|" + "---|---|" * len(shapes) + "---|")
        results = {shape: measure(calls, args.rounds, args.iters) for shape, calls in built.items()}
        names = list(next(iter(built.values())))
        fp32_sum = sum(statistics.median(results[s]["fp32"]) for s in shapes) if "fp32" in names else None
        for name in names:
            cells, total = [], 0.0
            for shape in shapes:
                ts = results[shape][name]
                med = statistics.median(ts)
                total += med
                gbs = built[shape][name][1] / (med * 1e-6) / 1e9
                cells.append(f"{med:.0f} ({min(ts):.0f}-{max(ts):.0f}) | {gbs:.1f}")
            vs = f"{fp32_sum / total:.2f}x" if fp32_sum else "-"
            print(f"| {name} | " + " | ".join(cells) + f" | {vs} |", flush=True)
    print(f"\n({time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
