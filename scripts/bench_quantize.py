"""Weight-only quantization side by side on a trained decoder: decode speed, perplexity and weight bytes at fp32,
bf16, our int8 / int4 (``finetune.quant``), torchao's int8 weight-only and transformers + bitsandbytes 8-bit / 4-bit
(what an HF user would pick). CPU, batch 1, greedy.

    python scripts/bench_quantize.py --train-only                  # once: trains and caches the model (see below)
    flock /tmp/finetune-bench.lock python scripts/bench_quantize.py   # the table (~1 min; training ~20 min once)
    options: --rounds 3 --new 128 --prompt 16 --ppl-tokens 1024 --threads N --only fp32,int8,...
             --hidden 512 --intermediate 1408 --layers 8 --heads 8 --vocab 32000 --train-steps 80 --cache DIR

The model is a LLaMA (hidden 512, 8 layers, 8 heads, vocab 32000: 58M parameters) trained from scratch for
``--train-steps`` steps (batch 4 x 128 tokens, AdamW) on the bundled quickstart story corpus
(``recipes/data/quickstart``, its 2048-token BPE; the other vocabulary rows stay as initialised but are read by the
output head every token like any others). The trained checkpoint is cached under ``--cache`` (an HF folder), so
reruns skip the training. Perplexity is on the first ``--ppl-tokens`` tokens of the corpus's validation file.

Decode: the prompt is the first ``--prompt`` tokens of a validation story, then ``--new`` greedy tokens (no stop
token). Every variant is built first, then ``--rounds`` rounds each time every variant once (interleaved), after a
warm-up; tokens/s is the median over rounds, the speedup is per round against that round's fp32, shown as median
(min-max). Bytes/token is what one decode step reads: every weight matrix (blocks and output head; the embedding
reads one row) as stored, so bytes/token x tokens/s is the memory bandwidth a variant achieves. Bits/weight is over
the block matrices (what is quantized), scales and zeros included as stored on disk (int4: two per byte).
"""

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.generation import generate
from finetune.models.hub import from_config, from_hf, to_hf
from finetune.quant import QuantConfig, QuantLinear, quantize_model

CORPUS = Path(__file__).resolve().parent.parent / "recipes" / "data" / "quickstart"


# ------------------------------------------------------------------------------------------------ trained model
def tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(CORPUS / "tokenizer"))


def corpus_ids(split: str) -> torch.Tensor:
    text = (CORPUS / f"{split}.txt").read_text()
    return torch.tensor(tokenizer()(text)["input_ids"])  # (N,)


def train(args, folder: Path) -> None:
    """Trains the bench model from scratch and writes it to ``folder`` (an HF folder, atomically)."""
    torch.manual_seed(0)
    config = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  max_position_embeddings=1024, tie_word_embeddings=False, bos_token_id=None,
                  eos_token_id=None)  # fmt: skip
    model = from_config(config).train()
    ids = corpus_ids("train")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup, steps = 10, args.train_steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.1416)))),
    )
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for step in range(steps):
        start = torch.randint(0, ids.numel() - 129, (4,), generator=g)
        batch = torch.stack([ids[s : s + 129] for s in start.tolist()])  # (4, 129)
        logits = model(batch[:, :-1])  # (4, 128, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    to_hf(model.eval(), folder)


def trained_model(args) -> tuple[nn.Module, Path]:
    name = f"llama-h{args.hidden}-i{args.intermediate}-l{args.layers}-v{args.vocab}-s{args.train_steps}"
    folder = Path(args.cache).expanduser() / name
    if not (folder / "config.json").is_file():
        print(f"training the bench model into {folder} (cached for reruns)", flush=True)
        train(args, folder)
    return from_hf(folder).eval(), folder


# ------------------------------------------------------------------------------------------------ measurements
def weight_matrices(model) -> list[tuple[str, nn.Module]]:
    """Every matrix a decode step reads in full: the blocks' linears and the output head (ours or transformers')."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, QuantLinear))]  # bnb's too
    return [(n, m) for n, m in linears if n.endswith("lm_head") or ".layers." in f".{n}."]


def stored_bytes(m: nn.Module) -> int:
    """Bytes of a matrix layer's weight as stored (ours: int8 rows or int4 two per byte, plus scales / zeros)."""
    if isinstance(m, QuantLinear):
        w = m.qweight.numel() * m.bits // 8
        return w + 4 * (m.scale.numel() + (m.zero.numel() if m.zero is not None else 0))
    w = m.weight
    state = getattr(w, "quant_state", None)  # bitsandbytes 4-bit: packed bytes + absmax per block of 64
    if state is not None:
        return w.numel() * w.element_size() + state.absmax.numel() * state.absmax.element_size()
    scb = getattr(w, "SCB", None)  # bitsandbytes 8-bit: int8 rows + one fp32 scale per row
    if scb is not None:
        return w.numel() + 4 * scb.numel()
    inner = getattr(w, "qdata", None)  # torchao Int8Tensor
    if inner is not None:
        return inner.numel() + 4 * w.scale.numel()
    return w.numel() * w.element_size()


def sizes(model) -> tuple[float, int]:
    """(bits per block weight as stored, bytes a decode step reads from the weight matrices)."""
    layers = weight_matrices(model)
    block = [(n, m) for n, m in layers if not n.endswith("lm_head")]
    n_weights = sum(m.in_features * m.out_features for _, m in block)
    return 8 * sum(stored_bytes(m) for _, m in block) / n_weights, sum(stored_bytes(m) for _, m in layers)


@torch.no_grad()
def perplexity(forward, ids: torch.Tensor) -> float:
    logits = forward(ids[:, :-1]).float()  # (B, T - 1, V)
    return float(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).exp())


def torchao_int8(full):
    """torchao's weight-only int8 (one scale per row) on a copy of our model's block linears."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ImportError("torchao is not installed (pip install torchao)") from None
    model = copy.deepcopy(full)
    quantize_(model.layers, Int8WeightOnlyConfig())
    return model


def bnb_model(folder: Path, bits: int):
    import transformers

    q = (transformers.BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
         transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32))  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu").eval()


def variants(full, folder: Path) -> dict:
    """name -> (build, is ours (else transformers), note)."""
    q = lambda cfg: lambda: quantize_model(copy.deepcopy(full), cfg)  # noqa: E731
    return {
        "fp32": (lambda: full, True, ""),
        "bf16": (lambda: copy.deepcopy(full).to(torch.bfloat16), True, "all weights and activations bf16"),
        "int8 (ours)": (q(QuantConfig(8)), True, "per channel; head fp32"),
        "int8 + head (ours)": (q(QuantConfig(8, head=True)), True, "per channel; head int8 too"),
        "int4 g32 (ours)": (q(QuantConfig(4, 32)), True, "scale + zero per 32; head fp32"),
        "int4 g128 (ours)": (q(QuantConfig(4, 128)), True, "scale + zero per 128; head fp32"),
        "int4 g32 + head (ours)": (q(QuantConfig(4, 32, head=True)), True, "head int4 g32 too"),
        "int8 (torchao)": (lambda: torchao_int8(full), True, "Int8WeightOnlyConfig, eager; head fp32"),
        "8-bit (transformers + bitsandbytes)": (lambda: bnb_model(folder, 8), False, "LLM.int8; head fp32"),
        "4-bit NF4 (transformers + bitsandbytes)": (lambda: bnb_model(folder, 4), False, "blocks of 64; head fp32"),
    }


def profile(run, name: str, new: int) -> None:
    """torch.profiler over one decode of ``new`` tokens: the operators that take the time, per token."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(new)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\nprofile of {name}: {total / new / 1e3:.2f} ms of operator time per token")
    print("| operator | calls / token | ms / token | share |\n|---|---|---|---|")
    for e in events[:10]:
        print(f"| {e.key} | {e.count / new:.1f} | {e.self_cpu_time_total / new / 1e3:.3f} "
              f"| {100 * e.self_cpu_time_total / total:.0f}% |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("hidden", 512), ("intermediate", 1408), ("layers", 8), ("heads", 8), ("vocab", 32000),
                          ("prompt", 16), ("new", 128), ("rounds", 3), ("threads", 0), ("ppl-tokens", 1024),
                          ("train-steps", 80)]:  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--only", default=None, help="comma-separated variant names (fp32 is always measured)")
    p.add_argument("--cache", default="~/.cache/finetune/bench_quantize", help="where the trained model is kept")
    p.add_argument("--train-only", action="store_true", help="train and cache the model, measure nothing")
    p.add_argument("--profile", default=None, help="a variant name: also print where its decode steps spend time")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="Int8Tensor does not implement")  # torchao, harmless
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", every call
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    full, folder = trained_model(args)
    if args.train_only:
        return
    val = corpus_ids("validation")
    text = val[: args.ppl_tokens].view(4, -1)  # (4, T) held out
    prompt = val[: args.prompt][None]  # (1, P)

    only = set(args.only.split(",")) | {"fp32"} if args.only else None
    runs, rows = {}, {}
    for name, (build, is_ours, note) in variants(full, folder).items():
        if only and name not in only:
            continue
        try:
            model = build()
        except (ImportError, RuntimeError, ValueError) as e:
            rows[name] = dict(note=f"{type(e).__name__}: {str(e)[:90]}")
            continue
        if is_ours:
            run = lambda n, m=model: generate(m, prompt, max_new_tokens=n)  # noqa: E731
            forward = model
        else:
            run = lambda n, m=model: m.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
            forward = lambda x, m=model: m(x).logits  # noqa: E731
        run(8)  # warm-up: kernels packed, caches grown
        bpw, nbytes = sizes(model)
        rows[name] = dict(ppl=perplexity(forward, text), bpw=bpw, bytes=nbytes, note=note, times=[])
        runs[name] = run
        print(f"{name}: ppl {rows[name]['ppl']:.3f}, {nbytes / 2**20:.1f} MiB/token", flush=True)
    for r in range(args.rounds):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run(args.new)
            rows[name]["times"].append(time.perf_counter() - t0)
        print(f"round {r + 1}: " + ", ".join(f"{n} {args.new / rows[n]['times'][-1]:.1f}" for n in runs), flush=True)

    if args.profile in runs:
        profile(runs[args.profile], args.profile, args.new)
    params = sum(p.numel() for p in full.parameters())
    base = rows["fp32"]
    print(f"\n{params / 1e6:.1f}M-parameter LLaMA trained {args.train_steps} steps on the quickstart corpus; batch 1, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy; {torch.get_num_threads()} threads; {args.rounds} "
          f"interleaved rounds; perplexity on {text.numel()} held-out tokens; torch {torch.__version__}\n")  # fmt: skip
    print(
        "| variant | decode tok/s | vs fp32 (min-max) | perplexity | vs fp32 | bits/weight (blocks) "
        "| MiB read/token | GB/s | note |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        if "times" not in row:
            print(f"| {name} | - | - | - | - | - | - | - | {row['note']} |")
            continue
        speed = args.new / statistics.median(row["times"])
        ratios = [b / t for b, t in zip(base["times"], row["times"], strict=True)]
        vs = f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"
        dp = f"{100 * (row['ppl'] / base['ppl'] - 1):+.2f}%"
        gbs = row["bytes"] * speed / 1e9
        print(f"| {name} | {speed:.1f} | {vs} | {row['ppl']:.3f} | {dp} | {row['bpw']:.2f} "
              f"| {row['bytes'] / 2**20:.1f} | {gbs:.1f} | {row['note']} |")  # fmt: skip
    print(f"\n({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
