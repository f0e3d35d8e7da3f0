"""Weight-only quantization side by side: decode speed, perplexity and weight bytes of one decoder at fp32, bf16,
our int8 / int4 (``finetune.quant``), torchao's int8 / int4 weight-only (when installed) and transformers +
bitsandbytes 8-bit / 4-bit (what an HF user would pick). CPU, batch 1, greedy.

    python scripts/bench_quantize.py            # hidden 512, 8 layers, vocab 32000: ~58M parameters
    options: --hidden 512 --intermediate 1408 --layers 8 --heads 8 --vocab 32000 --prompt 16 --new 128
             --repeats 3 --threads N --ppl-tokens 512 --only fp32,int8,...

The model is a random LLaMA with weights of std ``--init-scale`` / sqrt(fan_in) (peaked outputs, as a trained
model's are; HF's std-0.02 init gives near-uniform ones that no rounding can move), so "held-out text" is text the
fp32 model itself samples (temperature 1, a seed the timing prompts do not use): its perplexity under each variant
measures how far quantization moves the model's distribution, which is what the +1% / +5% targets are about; a
random model has no real text to score.
Decode tokens/s is the median over ``--repeats`` runs of ``--new`` tokens after a warm-up run; the prompt is
``--prompt`` random tokens. Weight bytes count the matrices of the blocks (what is quantized; embeddings and the
output head stay as they are in every variant but bitsandbytes, which keeps lm_head too); bits per weight include
scales and zeros as stored on disk (int4 packed two per byte). Prints a markdown table.
"""

import argparse
import copy
import statistics
import tempfile
import time

import torch
from torch import nn

from finetune.generation import generate
from finetune.models.hub import from_config, to_hf
from finetune.quant import QuantConfig, QuantLinear, quantize_model


def block_linears(model) -> list[nn.Module]:
    return [
        m for name, m in model.named_modules() if ".layers." in f".{name}" and isinstance(m, (nn.Linear, QuantLinear))
    ]


def bits_per_weight(model) -> tuple[float, int]:
    """(bits per block weight as stored, bytes of the block matrices)."""
    bits = n = 0
    for m in block_linears(model):
        w = m.in_features * m.out_features
        if isinstance(m, QuantLinear):
            extra = 32 * m.scale.numel() + (32 * m.zero.numel() if m.zero is not None else 0)
            bits += m.bits * w + extra
        else:
            bits += 8 * m.weight.element_size() * w
        n += w
    return bits / n, bits // 8


@torch.no_grad()
def perplexity(forward, ids: torch.Tensor) -> float:
    logits = forward(ids[:, :-1]).float()  # (B, T - 1, V)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    return float(nll.exp())


def decode_speed(run, repeats: int, new: int) -> float:
    run(8)  # warm-up: kernels packed, caches grown
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(new)
        times.append(time.perf_counter() - t0)
    return new / statistics.median(times)


def ours(model, prompt):
    return lambda n: generate(model, prompt, max_new_tokens=n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [
        ("hidden", 512),
        ("intermediate", 1408),
        ("layers", 8),
        ("heads", 8),
        ("vocab", 32000),
        ("prompt", 16),
        ("new", 128),
        ("repeats", 3),
        ("threads", 0),
        ("ppl-tokens", 512),
    ]:
        p.add_argument(f"--{name}", type=int, default=default)  # fmt: skip
    p.add_argument("--only", default=None, help="comma-separated variant names")
    p.add_argument("--init-scale", type=float, default=2.0)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = dict(model_type="llama", vocab_size=args.vocab, hidden_size=args.hidden,
                  intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                  max_position_embeddings=max(1024, args.ppl_tokens + 1), bos_token_id=None,
                  eos_token_id=None)  # fmt: skip
    full = from_config(config).eval()
    with torch.no_grad():
        for w in full.parameters():
            if w.dim() == 2:
                w.normal_(0, args.init_scale * w.size(-1) ** -0.5)
    params = sum(p.numel() for p in full.parameters())
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab, (1, args.prompt), generator=g)
    start = torch.randint(0, args.vocab, (4, 1), generator=g)
    text = generate(full, start, max_new_tokens=args.ppl_tokens // 4, temperature=1.0, seed=2)  # (4, T) held out

    variants = {
        "fp32": lambda: full,
        "bf16": lambda: copy.deepcopy(full).to(torch.bfloat16),
        "int8 (ours)": lambda: quantize_model(copy.deepcopy(full), QuantConfig(8)),
        "int4 g32 (ours)": lambda: quantize_model(copy.deepcopy(full), QuantConfig(4, 32)),
        "int4 g128 (ours)": lambda: quantize_model(copy.deepcopy(full), QuantConfig(4, 128)),
        "int8 (torchao)": lambda: torchao_model(full, 8),
        "int4 g128 (torchao)": lambda: torchao_model(full, 4),
    }
    rows = []
    only = set(args.only.split(",")) if args.only else None
    for name, make in variants.items():
        if only and name not in only:
            continue
        try:
            model = make()
        except ImportError as e:
            rows.append((name, None, None, None, None, str(e)))
            continue
        speed = decode_speed(ours(model, prompt), args.repeats, args.new)
        ppl = perplexity(lambda x, m=model: m(x), text)
        bpw, nbytes = bits_per_weight(model)
        rows.append((name, speed, ppl, bpw, nbytes, ""))
        print(f"{name}: {speed:.1f} tok/s, ppl {ppl:.3f}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        to_hf(full, f"{tmp}/hf")
        for bits in (8, 4):
            name = f"{bits}-bit (transformers + bitsandbytes)"
            if only and name not in only:
                continue
            try:
                hf = bnb_model(f"{tmp}/hf", bits)
            except (ImportError, RuntimeError, ValueError) as e:
                rows.append((name, None, None, None, None, f"{type(e).__name__}: {str(e)[:80]}"))
                continue
            run = lambda n, hf=hf: hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)  # noqa: E731
            speed = decode_speed(run, args.repeats, args.new)
            ppl = perplexity(lambda x, hf=hf: hf(x).logits, text)
            note = "LLM.int8: int8 rows + fp32 scales" if bits == 8 else "NF4, blocks of 64 + fp32 absmax"
            rows.append((name, speed, ppl, bits + 32 / 64 if bits == 4 else 8.0, None, note))
            print(f"{name}: {speed:.1f} tok/s, ppl {ppl:.3f}", flush=True)

    base = next((r for r in rows if r[0] == "fp32"), None)
    print(
        f"\n{params / 1e6:.1f}M parameters; batch 1, prompt {args.prompt}, {args.new} new tokens, greedy; "
        f"{torch.get_num_threads()} threads; perplexity on {text.numel()} tokens the fp32 model sampled\n"
    )
    print("| variant | decode tok/s | vs fp32 | perplexity | vs fp32 | bits/weight | block weight MB | note |")
    print("|---|---|---|---|---|---|---|---|")
    for name, speed, ppl, bpw, nbytes, note in rows:
        if speed is None:
            print(f"| {name} | - | - | - | - | - | - | {note} |")
            continue
        vs = f"{speed / base[1]:.2f}x" if base else "-"
        dp = f"{100 * (ppl / base[2] - 1):+.2f}%" if base else "-"
        mb = f"{nbytes / 2**20:.1f}" if nbytes else "-"
        print(f"| {name} | {speed:.1f} | {vs} | {ppl:.3f} | {dp} | {bpw:.2f} | {mb} | {note} |")


def torchao_model(full, bits: int):
    """torchao's weight-only int8 / int4 (group 128, its CPU layout) on a copy of our model's block linears."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ImportError("torchao is not installed (pip install torchao)") from None
    model = copy.deepcopy(full)
    if bits == 8:
        cfg = Int8WeightOnlyConfig()
    else:
        from torchao.dtypes import Int4CPULayout

        cfg = Int4WeightOnlyConfig(group_size=128, layout=Int4CPULayout())
    quantize_(model.layers, cfg)
    return model


def bnb_model(folder: str, bits: int):
    import transformers

    q = (transformers.BitsAndBytesConfig(load_in_8bit=True) if bits == 8 else
         transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32))  # fmt: skip
    return transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=q, device_map="cpu").eval()


if __name__ == "__main__":
    main()
