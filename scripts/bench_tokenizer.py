"""Benchmark `finetune.tokenizer` (pure Python) against Hugging Face `tokenizers` (Rust) on the same corpus.

    python scripts/bench_tokenizer.py [--files F [F ...]] [--vocab-size 2048] [--repeats 3]

Defaults: recipes/data/quickstart/train.txt, vocabulary 2048, 3 repeats. Runs are interleaved (ours, then
tokenizers, in each repeat) and the table shows medians:

- training: `train_bpe(files)` vs `Tokenizer.train(files)` with the equivalent BpeTrainer (byte-level alphabet,
  same special tokens, min_frequency 2); whether the two vocabularies and merge lists are identical;
- encoding: `encode_batch` over the corpus lines, in MB of UTF-8 per second, each run on a freshly loaded tokenizer
  (a cold word cache for both), and whether every line gets the same ids;
- tokenizers with one thread: the same in a child process started with RAYON_NUM_THREADS=1 and
  TOKENIZERS_PARALLELISM=false (the thread pool is fixed once a process has used it).

Prints a markdown table, the exact command and the machine (cores, versions).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from finetune.tokenizer.reference import tokenizers_trainer

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<pad>"]


def hf_train(files: list[str], vocab_size: int):
    tok, trainer = tokenizers_trainer(vocab_size, SPECIALS)
    tok.train(files, trainer=trainer)
    return tok


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def hf_runs(files: list[str], vocab_size: int, repeats: int, lines: list[str], tokenizer_json: str) -> dict:
    """tokenizers' training and encoding times (for the child process: one thread)."""
    from tokenizers import Tokenizer

    train, encode, ids = [], [], None
    for _ in range(repeats):
        train.append(timed(lambda: hf_train(files, vocab_size))[0])
        tok = Tokenizer.from_str(tokenizer_json)
        seconds, encodings = timed(lambda tok=tok: tok.encode_batch(lines, add_special_tokens=False))
        encode.append(seconds)
        ids = [e.ids for e in encodings]
    return {"train": train, "encode": encode, "ids": ids}


def child_main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    runs = hf_runs(spec["files"], spec["vocab_size"], spec["repeats"], spec["lines"], spec["tokenizer_json"])
    runs["ids_equal"] = runs.pop("ids") == spec["ours_ids"]
    print(json.dumps(runs))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", nargs="+", default=[str(ROOT / "recipes" / "data" / "quickstart" / "train.txt")])
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_main(args.child)

    import regex
    import tokenizers
    from tokenizers import Tokenizer

    from finetune.tokenizer import ByteLevelBPE, train_bpe

    files = [str(Path(f)) for f in args.files]
    lines = [line for f in files for line in Path(f).read_text(encoding="utf-8").splitlines()]
    megabytes = sum(len(line.encode("utf-8")) for line in lines) / 1e6
    corpus_mb = sum(Path(f).stat().st_size for f in files) / 1e6

    ours_train, hf_train_s, ours_enc, hf_enc = [], [], [], []
    ours_tok = hf_tok = ours_ids = hf_ids = None
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both alike
        seconds, ours_tok = timed(lambda: train_bpe(files, vocab_size=args.vocab_size, special_tokens=SPECIALS))
        ours_train.append(seconds)
        seconds, hf_tok = timed(lambda: hf_train(files, args.vocab_size))
        hf_train_s.append(seconds)
        fresh = ByteLevelBPE.load  # a new object: cold word cache
        with tempfile.TemporaryDirectory() as tmp:
            ours_fresh = fresh(ours_tok.save(Path(tmp) / "tok"))
        seconds, ours_ids = timed(lambda t=ours_fresh: t.encode_batch(lines))
        ours_enc.append(seconds)
        hf_fresh = Tokenizer.from_str(hf_tok.to_str())
        seconds, encodings = timed(lambda t=hf_fresh: t.encode_batch(lines, add_special_tokens=False))
        hf_enc.append(seconds)
        hf_ids = [e.ids for e in encodings]

    same_model = ours_tok.to_json() == json.loads(hf_tok.to_str())
    ours_json, theirs_json = ours_tok.to_json()["model"], json.loads(hf_tok.to_str())["model"]
    same_vocab = ours_json["vocab"] == theirs_json["vocab"]
    same_merges = ours_json["merges"] == theirs_json["merges"]

    # tokenizers with a single thread, in a child process
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(
            json.dumps(
                {
                    "files": files,
                    "vocab_size": args.vocab_size,
                    "repeats": args.repeats,
                    "lines": lines,
                    "tokenizer_json": hf_tok.to_str(),
                    "ours_ids": ours_ids,
                }
            ),
            encoding="utf-8",
        )
        env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(spec)], env=env, capture_output=True, text=True, check=True
        )
        single = json.loads(out.stdout.strip().splitlines()[-1])

    med = statistics.median
    t_ours, t_hf, t_1 = med(ours_train), med(hf_train_s), med(single["train"])
    e_ours, e_hf, e_1 = (megabytes / med(x) for x in (ours_enc, hf_enc, single["encode"]))
    print("| | ours (Python) | tokenizers | tokenizers, 1 thread | ours / tokenizers | ours / 1 thread |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| train, vocab {args.vocab_size} (s) | {t_ours:.2f} | {t_hf:.2f} | {t_1:.2f} | "
          f"{t_ours / t_hf:.2f}x time | {t_ours / t_1:.2f}x time |")  # fmt: skip
    print(f"| encode_batch (MB/s) | {e_ours:.2f} | {e_hf:.2f} | {e_1:.2f} | "
          f"{e_ours / e_hf:.2f}x speed | {e_ours / e_1:.2f}x speed |")  # fmt: skip
    print()
    print(f"- identical vocabulary: {same_vocab}; identical merges: {same_merges} ({len(ours_json['merges'])}); "
          f"identical tokenizer.json: {same_model}")  # fmt: skip
    print(f"- identical ids on all {len(lines):,} lines: ours vs tokenizers {ours_ids == hf_ids}, "
          f"vs tokenizers 1 thread {single['ids_equal']}")  # fmt: skip
    print(f"- corpus: {', '.join(files)} ({corpus_mb:.2f} MB, {len(lines):,} lines, {megabytes:.2f} MB encoded)")
    print(f"- medians of {args.repeats} interleaved runs; all runs (s): ours train {_fmt(ours_train)}, tokenizers "
          f"train {_fmt(hf_train_s)} / 1 thread {_fmt(single['train'])}; ours encode {_fmt(ours_enc)}, tokenizers "
          f"encode {_fmt(hf_enc)} / 1 thread {_fmt(single['encode'])}")  # fmt: skip
    print()
    command = " ".join(["python", "scripts/bench_tokenizer.py", *sys.argv[1:]])
    print(f"command: `{command}`")
    print(
        f"machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), {platform.system()}, "
        f"Python {platform.python_version()}, tokenizers {tokenizers.__version__}, regex {regex.__version__}"
    )


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    main()
