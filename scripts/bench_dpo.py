"""DPO with LoRA, ours against TRL's DPOTrainer + peft on the same model, data and settings: tokens/s and peak memory.

    flock /tmp/finetune-bench.lock python scripts/bench_dpo.py [--rounds 3 --hidden 256 --layers 4 --vocab 16000
        --pairs 64 --batch 4 --steps 8 --length 200 --threads 2 --workdir DIR]

A random fp32 LLaMA (vocabulary ``--vocab``, so the logits are the large tensor, as in real models) is saved with
``save_pretrained`` beside a byte-level tokenizer; ``--pairs`` preference rows of about ``--length`` tokens each are
written as JSONL. Each side trains ``--steps`` optimizer steps of ``--batch`` pairs in a fresh subprocess, LoRA r=8
on q_proj/v_proj, no dropout, lr 1e-4, the reference being the same model with the adapter disabled:
  - finetune: ``finetune fit`` with ``finetune.tasks.Preference`` (chunked log-probs: no logits held);
  - TRL: ``DPOTrainer(model, peft_config=LoraConfig(...))`` ``.train()``.
tokens/s counts the non-padding tokens of the chosen and rejected rows each side trains on (TRL's counted inside
its loss computation, so the batches are the ones it trains on) over the steps after the first 2 (warm-up), timed
at each step's end; peak memory is the child's ``ru_maxrss`` (CPU) or ``torch.cuda.max_memory_allocated`` (GPU),
minus a child that only imports the same libraries (CPU). ``--rounds`` rounds run the two sides interleaved (the
order alternating), each in a fresh subprocess; the table gives each round and the median ratio with its min-max.
"""

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2


def _words(i: int, n: int) -> str:
    vocab = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "a", "cat", "sat", "on", "mat"]
    return " ".join(vocab[(i * 7 + j * 3) % len(vocab)] + str((i + j) % 97) for j in range(n))


def setup(work: Path, a) -> None:
    import torch
    import transformers as T

    sys.path.insert(0, str(ROOT))
    from tests.conftest import make_tokenizer

    make_tokenizer(work / "model", "llama")
    tok = T.AutoTokenizer.from_pretrained(work / "model")
    # The model's vocabulary is --vocab (ids past the tokenizer's are never seen): the head's size is what counts.
    config = T.LlamaConfig(vocab_size=max(a.vocab, len(tok)), hidden_size=a.hidden, intermediate_size=a.hidden * 3,
                           num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64, num_key_value_heads=2,
                           max_position_embeddings=2 * a.length, bos_token_id=0, eos_token_id=1,
                           pad_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    T.LlamaForCausalLM(config).save_pretrained(work / "model")
    n = max(4, a.length // 6)  # words per completion (a word and its number: ~3 tokens)
    rows = [{"prompt": _words(i, n // 2), "chosen": " " + _words(i + 1, n), "rejected": " " + _words(i + 2, n)}
            for i in range(a.pairs)]  # fmt: skip
    (work / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def child(side: str, work: Path, a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    import lightning  # noqa: F401  (both children import the same libraries)
    import trl  # noqa: F401

    times, tokens = [], []
    if side == "imports":
        return {"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if side == "finetune":
        import lightning.pytorch as L

        from finetune.cli import main

        class Clock(L.Callback):
            def on_train_batch_end(self, trainer, module, outputs, batch, i):
                times.append(time.perf_counter())
                tokens.append(int(batch["attention_mask"].sum()))

        import yaml

        recipe = {
            "trainer": {"default_root_dir": tempfile.mkdtemp(prefix="run-", dir=work),  # a new run each round
                        "max_steps": a.steps, "enable_progress_bar": False, "logger": False,
                        "accelerator": "gpu" if cuda else "cpu", "devices": 1},
            "model": {"class_path": "finetune.tasks.Preference",
                      "init_args": {"pretrained": str(work / "model"), "lr": 1e-4, "max_new_tokens": 1,
                                    "adapter": {"preset": "lora", "r": 8, "lora_dropout": 0.0}}},
            "data": {"format": "preference", "train_files": str(work / "pairs.jsonl"), "batch_size": a.batch,
                     "max_length": 2 * a.length, "cache_dir": str(work / "cache")},
        }  # fmt: skip
        (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        args = ["fit", "--config", str(work / "recipe.yaml")]
        _patch_callbacks(Clock())
        assert main(args) == 0
    else:
        import datasets
        import transformers as T
        from peft import LoraConfig
        from trl import DPOConfig, DPOTrainer

        class Clock(T.TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                times.append(time.perf_counter())

        tok = T.AutoTokenizer.from_pretrained(work / "model")
        model = T.AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
        rows = [json.loads(line) for line in (work / "pairs.jsonl").read_text().splitlines()]
        config = DPOConfig(output_dir=str(work / "trl"), per_device_train_batch_size=a.batch, max_steps=a.steps,
                           learning_rate=1e-4, beta=0.1, report_to=[], use_cpu=not cuda, save_strategy="no",
                           logging_steps=1000, max_length=2 * a.length, dataloader_num_workers=0)  # fmt: skip
        peft = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        trainer = DPOTrainer(model=model, args=config, processing_class=tok, peft_config=peft,
                             train_dataset=datasets.Dataset.from_list(rows), callbacks=[Clock()])  # fmt: skip
        compute_loss = trainer.compute_loss

        def counted(model, inputs, *args, **kwargs):  # the batch it trains on: chosen and rejected rows
            tokens.append(int(inputs["attention_mask"].sum()))
            return compute_loss(model, inputs, *args, **kwargs)

        trainer.compute_loss = counted
        trainer.train()
    span = times[-1] - times[WARMUP - 1]
    out = {"tokens_per_s": sum(tokens[WARMUP : len(times)]) / span}
    out["peak_mb"] = (torch.cuda.max_memory_allocated() / 2**20 if cuda
                      else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # fmt: skip
    return out


def _patch_callbacks(cb) -> None:
    """Adds ``cb`` to the Trainer finetune's CLI builds (no recipe key for a Python object)."""
    import functools

    import lightning.pytorch as L

    init = L.Trainer.__init__

    @functools.wraps(init)  # LightningCLI reads the Trainer's signature
    def patched(self, *args, callbacks=None, **kwargs):
        init(self, *args, callbacks=[*(callbacks or []), cb], **kwargs)

    L.Trainer.__init__ = patched


def _run(argv: list[str], side: str) -> dict:
    out = subprocess.run([*argv, "--child", side], capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{side} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> str:
    values = sorted(values)
    return f"{values[len(values) // 2]:.2f}x ({values[0]:.2f}-{values[-1]:.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--child", default=None)
    a = p.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    if a.child:
        print(json.dumps(child(a.child, work, a)))
        return
    start = time.perf_counter()
    setup(work, a)
    argv = [sys.executable, __file__, *sys.argv[1:], "--workdir", str(work)]
    base = 0.0 if _cuda() else _run(argv, "imports")["rss_mb"]
    rounds = []
    for r in range(a.rounds):
        order = ("finetune", "trl") if r % 2 == 0 else ("trl", "finetune")
        result = {side: _run(argv, side) for side in order}
        for side in result.values():
            side["peak_mb"] -= base
        rounds.append(result)
    speed = [r["finetune"]["tokens_per_s"] / r["trl"]["tokens_per_s"] for r in rounds]
    memory = [r["finetune"]["peak_mb"] / r["trl"]["peak_mb"] for r in rounds]
    print(f"\nDPO, LoRA r=8, {a.layers} layers x {a.hidden}, vocabulary {a.vocab}, {a.batch} pairs of ~{a.length} "
          f"tokens a step, {a.steps} steps, {'GPU' if _cuda() else f'CPU {a.threads} threads'}\n")  # fmt: skip
    print("| round | finetune tokens/s | TRL tokens/s | ratio | finetune peak MB | TRL peak MB | ratio |")
    print("|---|---|---|---|---|---|---|")
    for i, (r, s_, m) in enumerate(zip(rounds, speed, memory, strict=True)):
        f, t = r["finetune"], r["trl"]
        print(f"| {i + 1} | {f['tokens_per_s']:.0f} | {t['tokens_per_s']:.0f} | {s_:.2f}x | {f['peak_mb']:.0f} | "
              f"{t['peak_mb']:.0f} | {m:.2f}x |")  # fmt: skip
    print(f"\nfinetune/TRL, median (min-max) over {a.rounds} rounds: tokens/s {_spread(speed)}, peak memory "
          f"{_spread(memory)}{'' if _cuda() else ' (above the imports)'}; benchmark took "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
