"""Training speed and memory: finetune against HF transformers + peft, same weights, same batches, one run.

    python scripts/bench_train.py                       # the default below: all modes, fp32 and bf16, on the CPU
    python scripts/bench_train.py --device cuda --hidden 2048 --intermediate 8192 --layers 16 --heads 32 \\
        --kv-heads 8 --vocab 128256 --batch 4 --seq 2048 --dtypes bf16 --modes lora-all full   # ~1.2B, on a GPU
    options: --hidden 256 --intermediate 688 --layers 4 --heads 8 --kv-heads 4 --vocab 8000 --batch 8 --seq 256
             --warmup 5 --steps 20 --modes lora-qv lora-all full --dtypes fp32 bf16 --contenders a b c d
             --threads (all cores) --rounds 1 --compile --json FILE

Each setting (mode, dtype) starts one fresh process per contender; they take turns step by step (a, b, c, d, a, ...),
so a slow spell of a shared machine hits all of them alike:
  (a) finetune, from-scratch LLaMA, under the Lightning Trainer (the CausalLM task, as `finetune fit` runs it)
  (b) finetune, HF `LlamaForCausalLM` backbone (backend: hf), under the Lightning Trainer
  (c) HF `LlamaForCausalLM` (SDPA attention) + peft, in a plain PyTorch loop: forward with labels, backward, step
  (d) the model of (a) in the same plain loop: the toolkit's own overhead is (d) vs (a)
All start from one random HF checkpoint (`save_pretrained`), train the same parameters (peft LoRA on the same
modules with the same preset values, or everything) with fused AdamW, on the same random full-length batches.
"bf16" is bf16-true: every weight (adapters too) in bf16, as Lightning's `bf16-true` converts the model.

With --rounds R every setting runs R times, the rounds interleaved over the settings (round 1 of every setting,
then round 2, ...); the table gives each ratio's median over the rounds with its range (min-max), so one slow
spell cannot make a ratio.

Measured: tokens/s from the median step time of `--steps` steps after `--warmup` steps (a step is one whole loop
iteration: forward, backward, optimizer, the Trainer's bookkeeping); peak memory of one further step. On a GPU that
is `torch.cuda.max_memory_allocated`. On the CPU, where torch keeps no such counter, it is the bytes alive when the
step starts (weights, optimizer state: counted exactly) plus the highest sum of allocations minus frees during the
step, from the profiler's memory events: the same quantity. MFU (GPU only): model FLOPs per token (6N for full
fine-tuning, 4N for LoRA: no weight gradients; N = parameters used in matmuls, the output head included) plus
attention's 12 * layers * seq * heads * head_dim, against the GPU's dense bf16 peak.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

CONTENDERS = {
    "a": "finetune, scratch model",
    "b": "finetune, HF backbone",
    "c": "HF + peft, plain loop",
    "d": "scratch model, plain loop",
}
MODES = {  # adapter of finetune's recipes (preset + overrides); None = full fine-tuning
    "lora-qv": {"preset": "lora", "target_modules": ["q_proj", "v_proj"]},
    "lora-all": {"preset": "lora-all-linear"},
    "full": None,
}
TURN_TIMEOUT_S = 900
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


# ----------------------------------------------------------------------------------------- measuring
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def live_bytes(model, optimizer) -> int:
    """Bytes of the distinct storages held by the model (weights, buffers, gradients) and the optimizer state."""

    tensors = [*model.parameters(), *model.buffers()]
    tensors += [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device.type != "meta"
    }
    return sum(storages.values())


class PeakMemory:
    """Peak bytes over a region (a training step): CUDA's allocator counter, or on the CPU ``live_bytes`` at the
    start plus the profiler's running allocation total."""

    def __init__(self, device: str) -> None:
        self.device = device

    def start(self, model, optimizer) -> None:

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        from torch.profiler import ProfilerActivity, profile

        self.base = live_bytes(model, optimizer)
        self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.prof.__enter__()

    def stop(self) -> int:

        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        self.prof.__exit__(None, None, None)
        cpu = torch.autograd.DeviceType.CPU
        events = [e for e in self.prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events = sorted((e for e in events if e.device_type() == cpu), key=lambda e: e.start_ns())
        total = peak = 0
        for e in events:
            total += e.nbytes()  # + allocated, - freed
            peak = max(peak, total)
        return self.base + peak


# -------------------------------------------------------------------------------------------- setup
def make_checkpoint(a, folder: Path) -> None:
    """One random HF LLaMA and a tokenizer of its vocabulary size (finetune's task loads both from the folder)."""
    from tokenizers import Tokenizer, models

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=max(a.seq, 2048),
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"t{i}": i for i in range(3, a.vocab)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(folder)


def batches(a, n: int = 4) -> list[list[list[int]]]:
    """``n`` distinct batches of full-length rows of random token ids (the steps cycle through them)."""

    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, a.vocab, (a.batch, a.seq), generator=g).tolist() for _ in range(n)]


def finetune_batches(a) -> list[dict]:
    """Batches as finetune's DataModule makes them (its collator: no padding, so no attention mask is used)."""
    from finetune.data.collate import Collator

    collate = Collator(pad_id=0)
    return [collate([{"input_ids": r, "labels": r} for r in rows]) for rows in batches(a)]


def hf_batches(a) -> list[dict]:
    """Batches as an HF user makes them: input_ids, an all-ones attention_mask, labels = input_ids."""

    out = []
    for rows in batches(a):
        ids = torch.tensor(rows)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def to_device(batch: dict, device: str) -> dict:
    return {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ workers
class Baton:
    """Turns between the contenders' processes, a token passed around a ring of pipes: one step each, a, b, c, d,
    a, ..., so a slow spell of a shared machine hits all of them alike. A waiting process blocks in a read (no CPU).
    (Processes, not threads: torch ops in a second thread of one process ran up to 2x slower here.)"""

    def __init__(self, recv, send) -> None:
        self.recv, self.send = recv, send

    def take(self) -> None:
        if not self.recv.poll(TURN_TIMEOUT_S):
            raise TimeoutError(f"no turn in {TURN_TIMEOUT_S} s: did another contender fail?")
        self.recv.recv()

    def pass_on(self) -> None:
        self.send.send(None)


class Steps:
    """One contender's step times (between baton hand-overs) and the peak memory of its last step."""

    def __init__(self, a, baton: Baton) -> None:
        self.a, self.baton = a, baton
        self.times, self.peak, self.meter, self.t0 = [], None, PeakMemory(a.device), None

    def begin(self, i: int, model, optimizer) -> None:
        if i > 0:  # the previous step ends here: for the Trainer, everything its loop does between batches counts
            self.end(i - 1)
            self.baton.pass_on()
            self.baton.take()
        if i == self.a.warmup + self.a.steps:  # one more step, untimed, for memory
            self.meter.start(*self.state())
        sync(self.a.device)
        self.t0 = time.perf_counter()

    def end(self, i: int) -> None:
        sync(self.a.device)
        if self.a.warmup <= i < self.a.warmup + self.a.steps:
            self.times.append(time.perf_counter() - self.t0)
        if i == self.a.warmup + self.a.steps and self.peak is None:
            self.peak = self.meter.stop()

    def result(self, model) -> dict:
        return {"step_s": self.times, "peak": self.peak, "matmul_params": matmul_params(model)}


def measure(a, steps: Steps):
    """A Lightning callback that times each loop iteration into ``steps`` (and measures the last one's memory)."""
    import lightning.pytorch as L

    class Measure(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, i) -> None:
            steps.state = lambda: (module, trainer.optimizers[0])
            steps.begin(i, module, trainer.optimizers[0])

        def on_train_batch_end(self, trainer, module, outputs, batch, i) -> None:
            if i == a.warmup + a.steps:
                steps.end(i)

    return Measure()


def run_lightning(a, steps: Steps, folder: str, backend: str) -> dict:
    """(a)/(b): the CausalLM task under the Lightning Trainer; the callback times each loop iteration."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from finetune.tasks import CausalLM

    task = CausalLM(pretrained=folder, backend=backend, adapter=MODES[a.mode], lr=1e-4, compile=a.compile)
    trainer = L.Trainer(
        accelerator="gpu" if a.device == "cuda" else "cpu", devices=1, max_steps=a.warmup + a.steps + 1,
        precision="bf16-true" if a.dtype == "bf16" else "32-true", logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[measure(a, steps)],
    )  # fmt: skip
    data = finetune_batches(a)
    loader = DataLoader([data[i % len(data)] for i in range(a.warmup + a.steps + 1)], batch_size=None)
    trainer.fit(task, train_dataloaders=loader)
    return steps.result(task.model)


def run_plain(a, steps: Steps, folder: str, ours: bool) -> dict:
    """(c)/(d): forward, loss, backward, fused AdamW step, zero_grad(set_to_none) in a plain loop."""

    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    if ours:
        from finetune.nn.loss import linear_cross_entropy
        from finetune.tasks import CausalLM
        from finetune.tasks.causal_lm import next_token_labels

        task = CausalLM(pretrained=folder, adapter=MODES[a.mode])  # builds and injects exactly as (a) does
        task.configure_model()
        model, data = task.model, finetune_batches(a)

        def loss_of(batch):  # what the task's step computes
            labels = next_token_labels(batch["labels"])
            return linear_cross_entropy(model(batch["input_ids"], head=False), model.lm_head.weight, labels)[0]
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
        if MODES[a.mode] is not None:
            from peft import LoraConfig, get_peft_model

            from finetune.adapters import load_spec

            model = get_peft_model(model, LoraConfig(**load_spec(MODES[a.mode]).fields, task_type="CAUSAL_LM"))
        data = hf_batches(a)

        def loss_of(batch):
            return model(**batch).loss

    model = model.to(device=a.device, dtype=dtype).train()
    if a.compile:
        model.compile()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    data = [to_device(b, a.device) for b in data]
    steps.state = lambda: (model, opt)
    for i in range(a.warmup + a.steps + 1):
        steps.begin(i, model, opt)
        loss_of(data[i % len(data)]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    steps.end(a.warmup + a.steps)
    return steps.result(model)


def matmul_params(model) -> int:
    """Parameters used in matrix products per token (linear layers, adapters and output head; not embeddings)."""

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def contender(a, c: str, recv, send, out) -> None:
    """One contender's process: its model is built in its turn, then it steps in turn with the others."""

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    baton = Baton(recv, send)
    baton.take()
    steps = Steps(a, baton)
    if c in "ab":
        result = run_lightning(a, steps, a.folder, backend="scratch" if c == "a" else "hf")
    else:
        result = run_plain(a, steps, a.folder, ours=c == "d")
    baton.pass_on()  # the last turn
    out.send(result)


def run_setting(a) -> dict:
    """All contenders of one setting (mode, dtype), each in a fresh process, taking turns step by step."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")
    ring = [ctx.Pipe(duplex=False) for _ in a.contenders]  # (recv, send): contender k reads ring[k], writes k + 1
    outs = [ctx.Pipe(duplex=False) for _ in a.contenders]
    procs = [
        ctx.Process(target=contender, args=(a, c, ring[k][0], ring[(k + 1) % len(ring)][1], outs[k][1]))
        for k, c in enumerate(a.contenders)
    ]
    for p in procs:
        p.start()
    ring[0][1].send(None)  # the first turn
    results, pending = {}, dict(zip((p.sentinel for p in procs), range(len(procs)), strict=True))
    while pending:
        for sentinel in wait(list(pending)):
            k = pending.pop(sentinel)
            procs[k].join()
            if procs[k].exitcode != 0 or not outs[k][0].poll():
                for p in procs:
                    p.terminate()
                sys.exit(f"({a.contenders[k]}) {a.mode} {a.dtype} failed (exit code {procs[k].exitcode}); see above")
            results[a.contenders[k]] = outs[k][0].recv()
    return results


# ------------------------------------------------------------------------------------------- driver
def mfu(a, result: dict, tokens_per_s: float, lora: bool) -> float | None:
    if a.device != "cuda":
        return None

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    if peak is None:
        return None
    attention = 12 * a.layers * a.seq * a.hidden  # QK^T and AV, forward and backward (heads * head_dim = hidden)
    per_token = (4 if lora else 6) * result["matmul_params"] + attention
    return tokens_per_s * per_token / peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("hidden", 256), ("intermediate", 688), ("layers", 4), ("heads", 8), ("kv-heads", 4),
                          ("vocab", 8000), ("batch", 8), ("seq", 256), ("warmup", 5), ("steps", 20),
                          ("threads", os.cpu_count())]:  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=list(CONTENDERS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--compile", action="store_true", help="torch.compile every contender's model")
    p.add_argument("--rounds", type=int, default=1, help="run every setting this many times, interleaved")
    p.add_argument("--json", help="also write the raw results here")
    a = p.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as folder:
        make_checkpoint(a, Path(folder))
        for round_ in range(a.rounds):
            for dtype in a.dtypes:
                for mode in a.modes:
                    setting = argparse.Namespace(**{**vars(a), "mode": mode, "dtype": dtype, "folder": folder})
                    for c, r in run_setting(setting).items():
                        r |= {"contender": c, "mode": mode, "dtype": dtype, "round": round_}
                        r["tokens_per_s"] = a.batch * a.seq / statistics.median(r["step_s"])
                        r["mfu"] = mfu(a, r, r["tokens_per_s"], lora=mode != "full")
                        results.append(r)
                        speed = f"{r['tokens_per_s']:.0f} tokens/s, peak {r['peak'] / 2**20:.0f} MiB"
                        print(f"  round {round_ + 1}: ({c}) {mode} {dtype}: {speed}", file=sys.stderr)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1) + "\n")

    print(table(a, results))


def _spread(values: list[float], fmt: str, unit: str = "") -> str:
    """The median, with the range over rounds when there are several."""
    mid = format(statistics.median(values), fmt) + unit
    return mid if len(values) == 1 else f"{mid} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def table(a, results: list[dict]) -> str:
    """The markdown table: per setting and contender the median over rounds of tokens/s and peak memory, and of
    their ratios to (c) in the same round, with the ratios' range over the rounds."""

    gpu = a.device == "cuda"
    device = torch.cuda.get_device_name() if gpu else f"CPU, {a.threads} threads"
    rounds = f"; {a.rounds} interleaved rounds, median (min-max)" if a.rounds > 1 else ""
    lines = [
        f"LLaMA hidden {a.hidden}, intermediate {a.intermediate}, {a.layers} layers, {a.heads} heads / {a.kv_heads} "
        f"KV, vocab {a.vocab}; batch {a.batch} x {a.seq} tokens; {device}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; median of {a.steps} steps after {a.warmup}{', compiled' if a.compile else ''}"
        f"{rounds}",
        "",
        "| dtype | training | contender | tokens/s | vs (c) | peak MiB | vs (c) |" + (" MFU |" if gpu else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if gpu else ""),
    ]
    ref = {(r["mode"], r["dtype"], r["round"]): r for r in results if r["contender"] == "c"}
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["dtype"], r["mode"], r["contender"]), []).append(r)
    for (dtype, mode, contender), rs in groups.items():
        refs = [ref.get((mode, dtype, r["round"])) for r in rs]
        have = all(refs)
        pairs = list(zip(rs, refs, strict=True))
        speed = _spread([r["tokens_per_s"] / c["tokens_per_s"] for r, c in pairs], ".2f", "x") if have else "-"
        memory = _spread([r["peak"] / c["peak"] for r, c in pairs], ".2f", "x") if have else "-"
        tokens = statistics.median(r["tokens_per_s"] for r in rs)
        peak = statistics.median(r["peak"] for r in rs)
        name = f"({contender}) {CONTENDERS[contender]}"
        row = f"| {dtype} | {mode} | {name} | {tokens:.0f} | {speed} | {peak / 2**20:.0f} | {memory} |"
        if gpu:
            m = [r["mfu"] for r in rs if r["mfu"] is not None]
            row += f" {statistics.median(m):.1%} |" if m else " - |"
        lines.append(row)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
