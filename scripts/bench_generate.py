"""Greedy decode speed: our KV-cache `generate` against HF `generate`, same weights, same prompts, one run.

    python scripts/bench_generate.py [--hidden 512 --layers 8 --heads 8 --kv-heads 4 --vocab 8000]
        [--batch 1 --prompt 128 --new 128 --repeats 3 --threads 2]

Both models come from one random HF LLaMA saved with `save_pretrained`; runs are interleaved and the
median of `--repeats` is reported. Prints a markdown table with tokens/s and the ratio ours / HF.
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
    for name, default in [("hidden", 512), ("layers", 8), ("heads", 8), ("kv-heads", 4), ("vocab", 8000),
                          ("batch", 1), ("prompt", 128), ("new", 128), ("repeats", 3), ("threads", 2)]:  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=int(a.hidden * 8 / 3) // 64 * 64,
        num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.prompt + a.new,
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
    hf_tps = tok / statistics.median(times["transformers"])
    print(f"LLaMA hidden {a.hidden}, {a.layers} layers, {a.heads} heads / {a.kv_heads} KV, vocab {a.vocab}; "
          f"batch {a.batch}, prompt {a.prompt}, {a.new} new tokens; torch {torch.__version__}, "
          f"transformers {transformers.__version__}, {a.threads} threads\n")  # fmt: skip
    print("| generate | tokens/s | vs transformers |\n|---|---|---|")
    for name, ts in times.items():
        tps = tok / statistics.median(ts)
        print(f"| {name} | {tps:.1f} | {tps / hf_tps:.2f}x |")


if __name__ == "__main__":
    main()
