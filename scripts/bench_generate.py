"""Greedy decode speed: our KV-cache `generate` against HF `generate`, same weights, same prompts, one run.

    python scripts/bench_generate.py            # the quickstart recipe's model (recipes/quickstart.yaml)
    python scripts/bench_generate.py --hidden 512 --intermediate 1344 --layers 8 --heads 8 --kv-heads 4 \\
        --vocab 8000 --untied                   # the bigger model this bench used before
    options: --hidden 128 --intermediate 3*hidden --layers 4 --heads 4 --kv-heads 2 --vocab 2048 --context 256
             --untied --batch 1 --prompt 128 --new 128 --repeats 9 --threads 2

Both models come from one random HF LLaMA saved with `save_pretrained`. Runs alternate (ours, HF, ours, ...):
tokens/s is the median of `--repeats` runs, and the ratio the median of the ratios of back-to-back pairs, which
holds steadier than single runs on a shared machine (those vary by tens of percent). Prints a markdown table, after
checking that both produce the same tokens.

Speculative decoding is not benchmarked here: a random model's greedy output repeats one token, so any draft (even
the target's first layer alone) agrees with it ~97% of the time, and the speed-up would be an artifact. Its speed
only means something with a trained target and draft.
"""

import argparse
import statistics
import tempfile
import time

import torch
import transformers

from finetune.generation import generate
from finetune.models import from_hf


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("hidden", 128), ("intermediate", None), ("layers", 4), ("heads", 4), ("kv-heads", 2),
                          ("vocab", 2048), ("context", 256), ("batch", 1), ("prompt", 128), ("new", 128),
                          ("repeats", 9), ("threads", 2)]:  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--untied", action="store_true", help="an output head of its own (default: tied to the embedding)")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate or 3 * a.hidden,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.context, tie_word_embeddings=not a.untied,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = from_hf(tmp)
    ids = torch.randint(3, a.vocab, (a.batch, a.prompt))
    # Fixed length on both sides: no EOS stopping, every run decodes exactly `new` tokens.
    run_ours = lambda: generate(ours, ids, max_new_tokens=a.new, eos_token_id=[])  # noqa: E731
    run_hf = lambda: hf.generate(  # noqa: E731
        ids, max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    assert torch.equal(run_ours(), run_hf()), "greedy outputs differ"  # also the warm-up
    times = {"finetune": [], "transformers": []}
    with torch.inference_mode():
        for _ in range(a.repeats):
            times["finetune"].append(timed(run_ours))
            times["transformers"].append(timed(run_hf))
    tok = a.batch * a.new
    print(f"LLaMA hidden {a.hidden}, intermediate {config.intermediate_size}, {a.layers} layers, {a.heads} heads / "
          f"{a.kv_heads} KV, vocab {a.vocab}, {'untied' if a.untied else 'tied'}; batch {a.batch}, prompt {a.prompt}, "
          f"{a.new} new tokens; torch {torch.__version__}, transformers {transformers.__version__}, {a.threads} "
          f"threads, median of {a.repeats}\n")  # fmt: skip
    print("| generate | tokens/s | vs transformers |\n|---|---|---|")
    for name, ts in times.items():
        ratio = statistics.median(hf / t for hf, t in zip(times["transformers"], ts, strict=True))
        print(f"| {name} | {tok / statistics.median(ts):.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
