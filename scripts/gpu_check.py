"""Every GPU claim of the toolkit, checked in one call, as a table: claim | result | detail.

    python scripts/gpu_check.py                    # on a GPU: the 1B-class sizes; on a CPU: tiny sizes
    python scripts/gpu_check.py --size tiny --json results.json --budget 420 --only train-bf16-true-lora
    (scripts/gpu_check.sh installs `datasets` / DeepSpeed from local wheels first, then runs this)

Rows run in worker processes (``--worker``): on a GPU one process per row, so an out-of-memory error or a broken CUDA
context stays in its row; on a CPU one process for all rows (imports are the slow part there). Each row has its own
timeout (the worker is killed and the next rows go on in a fresh one) and the whole check a time budget (rows not
started in it are reported, not run). A row's result is ``pass``, ``fail: why`` or ``skipped: why``; rows that need a
GPU report ``skipped: no GPU`` on a CPU, every other row must pass there (tests/scripts/test_gpu_check.py).

Rows: a random LLaMA checkpoint (1B-class: TinyLlama's shape, 1.1B parameters; GQA 32/4 heads); LoRA and full
fine-tuning at bf16-mixed and bf16-true, with and without gradient checkpointing (losses finite, the trained weights
change and have the precision's dtype; GPU: peak memory, and checkpointing must lower it); which SDPA kernel runs
(profiler op names: flash for causal MHA and for unmasked GQA through ``enable_gqa``; with a padding mask K/V are
repeated and the memory-efficient kernel must run, not the math one); QLoRA (NF4 ``Linear4bit`` base) on the GPU;
``fsdp``, FSDP2 (``ModelParallelStrategy``) and ``deepspeed_stage_2`` on one device; the serving engine's batched
greedy tokens against ``generate`` alone; ``scripts/bench_train.py
--device cuda`` (finetune against HF + peft, LoRA, bf16) with MFU, which must reach 50%.
"""

import argparse
import dataclasses
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
SIZES = {  # bench_train.py's options; steps are optimizer steps per training row
    "tiny": dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=320, batch=2, seq=32, steps=3),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, batch=4, seq=1024,
               steps=4),
}  # fmt: skip
MFU_TARGET = 0.5
START_TIMEOUT_S = 180  # a worker's imports, before its first row starts


class Skip(Exception):
    """A row that cannot run here (``skipped: <message>``)."""


@dataclass
class Row:
    name: str
    claim: str
    fn: object  # (args) -> detail str, or (detail, data dict)
    gpu: bool  # needs a GPU
    timeout_s: int


ROWS: list[Row] = []


def row(name: str, claim: str, *, gpu: bool = False, timeout_s: int = 120):
    def register(fn):
        ROWS.append(Row(name, claim, fn, gpu, timeout_s))
        return fn

    return register


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def bench_train():
    """``scripts/bench_train.py`` as a module: its checkpoint, batches, FLOP count and MFU are reused here."""
    sys.path.insert(0, str(SCRIPTS))
    import bench_train as module

    return module


# ---------------------------------------------------------------------------------------------- rows
@row("checkpoint", "a random LLaMA checkpoint and tokenizer (the base of every training row)", timeout_s=300)
def make_checkpoint(a) -> str:
    import torch

    folder = Path(a.folder)
    if not (folder / "config.json").is_file():
        with torch.device("cuda" if cuda() else "cpu"):  # a 1B model initializes in seconds on the GPU
            bench_train().make_checkpoint(a, folder)
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    params = size / 4  # saved in fp32
    return f"{params / 1e6:,.1f}M parameters ({a.hidden} hidden, {a.layers} layers, {a.heads}/{a.kv_heads} heads)"


def fit(
    a, *, precision: str, adapter, gradient_checkpointing: bool = False, strategy="auto", nf4: bool = False
) -> tuple[str, dict]:
    """``a.steps`` optimizer steps of the CausalLM task under the Lightning Trainer on random full-length batches
    (as bench_train.py's contender (a)); checks losses finite and (single device) that what trains changed and is
    kept in the precision's dtype, or with ``nf4`` that the base is bitsandbytes' ``Linear4bit``."""
    import lightning.pytorch as L
    import torch
    from torch.utils.data import DataLoader

    from finetune.tasks import CausalLM

    class Record(L.Callback):
        def __init__(self) -> None:
            self.losses, self.before, self.t0 = [], {}, None

        def on_train_start(self, trainer, module) -> None:
            named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
            self.before = {n: p.detach().clone() for n, p in named[:4]}  # a few trained tensors
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, i) -> None:
            self.losses.append(float(trainer.callback_metrics.get("train/loss_step", outputs["loss"])))

    task = CausalLM(pretrained=a.folder, adapter=adapter, lr=1e-4, gradient_checkpointing=gradient_checkpointing)
    record = Record()
    trainer = L.Trainer(
        accelerator="gpu" if cuda() else "cpu", devices=1, strategy=strategy, max_steps=a.steps, precision=precision,
        logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[record],
    )  # fmt: skip
    data = bench_train().finetune_batches(argparse.Namespace(**vars(a)))
    loader = DataLoader([data[i % len(data)] for i in range(a.steps)], batch_size=None)
    if cuda():
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=loader)
    seconds = time.perf_counter() - record.t0
    if len(record.losses) != a.steps or not all(math.isfinite(x) for x in record.losses):
        raise AssertionError(f"losses {record.losses} (expected {a.steps} finite values)")
    detail = f"loss {record.losses[0]:.3f} -> {record.losses[-1]:.3f}; {a.steps * a.batch * a.seq / seconds:.0f} tok/s"
    data = {}
    if strategy == "auto":
        params = dict(task.named_parameters())
        changed = [n for n, w in record.before.items() if not torch.equal(params[n].detach().cpu(), w.cpu())]
        if not changed:
            raise AssertionError(f"no trained weight changed ({sorted(record.before)})")
        dtypes = {str(params[n].dtype).removeprefix("torch.") for n in record.before}
        want = "bfloat16" if precision == "bf16-true" else "float32"
        if nf4:
            quantized = sum(type(m).__name__ == "Linear4bit" for m in task.modules())
            if not quantized:
                raise AssertionError("no Linear4bit layer in the model: the base is not quantized")
            detail += f"; {quantized} Linear4bit layers, adapters {'/'.join(sorted(dtypes))}"
        elif dtypes != {want}:
            raise AssertionError(f"trained weights are {dtypes}, expected {want} under {precision}")
        else:
            detail += f"; trained weights {want}"
    if cuda():
        data["peak"] = torch.cuda.max_memory_allocated()
        detail += f"; peak {data['peak'] / 2**30:.1f} GiB"
    return detail, data


LORA = "lora-all-linear"
for _precision in ("bf16-mixed", "bf16-true"):
    for _mode, _adapter in (("lora", LORA), ("full", None)):
        for _gc in (False, True):
            _name = f"train-{_precision}-{_mode}{'-gc' if _gc else ''}"
            _claim = f"{'LoRA (all linear)' if _adapter else 'full'} fine-tuning, {_precision}" + (
                ", gradient checkpointing" if _gc else ""
            )
            row(_name, _claim, timeout_s=300)(
                lambda a, p=_precision, ad=_adapter, gc=_gc: fit(a, precision=p, adapter=ad, gradient_checkpointing=gc)
            )


@row("serve-engine", "serving engine: concurrent greedy requests of different lengths get generate's tokens alone",
     timeout_s=300)  # fmt: skip
def serve_engine(a) -> str:
    """Six prompts of different lengths decoded together by the continuous-batching engine (rows of different
    lengths: masked, batched steps) against ``generate`` on each alone, on the GPU when there is one; with the
    tokens/s of both. A mismatch reports the single row's top-2 logit gap where the two part (a tie or not)."""
    import queue

    import torch

    from finetune import inference
    from finetune.generation import SamplingConfig, generate
    from finetune.serving.engine import Engine, Request
    from finetune.serving.text import TextOut

    device = "cuda" if cuda() else "cpu"
    loaded, n_new = inference.load(a.folder, device=device), 16
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, a.vocab, (n,), generator=g).tolist() for n in (5, 17, 9, 33, 2, 12)]

    def alone(ids: list[int]) -> list[int]:
        out = generate(loaded.model, torch.tensor([ids], device=device), max_new_tokens=n_new, eos_token_id=[])
        return out[0, len(ids) :].tolist()

    alone(prompts[0])  # warm-up
    t0 = time.perf_counter()
    expected = [alone(p) for p in prompts]
    t_alone = time.perf_counter() - t0
    engine, done = Engine(loaded.model, max_batch=len(prompts)), queue.Queue()
    emit = lambda e: ("finish_reason" in e or "error" in e) and done.put(e)  # noqa: E731
    reqs = [Request(p, SamplingConfig(max_new_tokens=n_new), [], TextOut(loaded.tokenizer, []), emit) for p in prompts]
    for r in reqs:
        engine.submit(r)
    t0 = time.perf_counter()
    engine.start()
    try:
        events = [done.get(timeout=120) for _ in reqs]
    finally:
        engine.stop(timeout=10)
    t_batched = time.perf_counter() - t0
    if errors := [e["error"] for e in events if "error" in e]:
        raise AssertionError(errors[0])
    for i, (r, want) in enumerate(zip(reqs, expected, strict=True)):
        if r.generated != want:
            j = next(j for j, (x, y) in enumerate(zip(r.generated, want, strict=True)) if x != y)
            with torch.inference_mode():
                logits = loaded.model(torch.tensor([prompts[i] + want[:j]], device=device))[0, -1].float()
            top = logits.topk(2).values
            raise AssertionError(f"request {i} parts from generate at token {j} ({r.generated[j]} vs {want[j]}; "
                                 f"top-2 logit gap alone {float(top[0] - top[1]):.2e})")  # fmt: skip
    tokens = n_new * len(prompts)
    return (f"{len(prompts)} requests = generate alone ({device}); {tokens / t_batched:.0f} tok/s batched, "
            f"{tokens / t_alone:.0f} one at a time")  # fmt: skip


def sdpa_ops(fn) -> set[str]:
    """The ``aten::_scaled_dot_product_*`` ops (the chosen SDPA backend) that ``fn()`` ran, from the profiler, and
    ``aten::repeat_interleave`` if K/V were repeated."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    keys = {e.key for e in prof.key_averages()}
    return {k for k in keys if k.startswith("aten::_scaled_dot_product") or k == "aten::repeat_interleave"}


def attention_pass(kv_heads: int, *, padded: bool):
    """A forward and backward pass of a 2-layer LLaMA of ours (bf16 on the GPU), causal, optionally with a
    left-padded row (a padding mask); returns the pass as a function."""
    import torch

    from finetune.models import from_config

    device = "cuda" if cuda() else "cpu"
    config = dict(model_type="llama", hidden_size=1024, intermediate_size=2048, num_hidden_layers=2, vocab_size=1024,
                  num_attention_heads=16, num_key_value_heads=kv_heads, max_position_embeddings=512)  # fmt: skip
    model = from_config(config).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
    ids = torch.randint(0, 1024, (2, 512), device=device)
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # row 1 left-padded

    def run() -> None:
        out = model(ids, attention_mask=mask if padded else None)
        (out if isinstance(out, torch.Tensor) else out.logits).float().mean().backward()

    return run


def expect_kernel(kv_heads: int, padded: bool, want: str, repeated: bool = False) -> str:
    fn = attention_pass(kv_heads, padded=padded)
    fn()  # warm up
    ops = sdpa_ops(fn)
    if ("aten::repeat_interleave" in ops) != repeated:
        raise AssertionError(f"K/V {'not ' if repeated else ''}repeated (ops {sorted(ops)})")
    ran = sorted(o.removeprefix("aten::_scaled_dot_product_") for o in ops if "repeat" not in o)
    if not any(o.startswith(f"aten::_scaled_dot_product_{want}") for o in ops):
        raise AssertionError(f"expected the {want} kernel; ran {ran}")
    if any("math" in o for o in ops):
        raise AssertionError(f"the math kernel ran too: {ran}")
    return f"ran {ran}"


@row("sdpa-flash-mha", "SDPA runs the flash kernel (causal MHA, no mask)", gpu=True)
def flash_mha(a) -> str:
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    detail = expect_kernel(16, padded=False, want="flash")
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # flash only: raises if the model's call does not fit it
        attention_pass(16, padded=False)()
    torch.cuda.synchronize()
    return detail + "; runs under sdpa_kernel(FLASH_ATTENTION)"


@row("sdpa-flash-gqa", "SDPA runs the flash kernel for GQA (enable_gqa, no mask)", gpu=True)
def flash_gqa(a) -> str:
    return expect_kernel(4, padded=False, want="flash")


@row("sdpa-gqa-padded", "GQA with a padding mask: K/V repeated, memory-efficient kernel (not math)", gpu=True)
def gqa_padded(a) -> str:
    return expect_kernel(4, padded=True, want="efficient", repeated=True) + "; K/V repeated"


@row("qlora", "QLoRA (NF4 Linear4bit base, bf16 compute) trains on the GPU", gpu=True, timeout_s=300)
def qlora(a) -> tuple[str, dict]:
    return fit(a, precision="bf16-true", adapter="qlora", nf4=True)


@row("strategy-fsdp", "strategy fsdp (FSDP1) on one device, LoRA, bf16-true", gpu=True, timeout_s=300)
def strategy_fsdp(a) -> tuple[str, dict]:
    return fit(a, precision="bf16-true", adapter=LORA, strategy="fsdp")


@row("strategy-fsdp2", "FSDP2 (ModelParallelStrategy) on one device, LoRA, bf16-true", gpu=True, timeout_s=300)
def strategy_fsdp2(a) -> tuple[str, dict]:
    from lightning.pytorch.strategies import ModelParallelStrategy

    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1)
    return fit(a, precision="bf16-true", adapter=LORA, strategy=strategy)


@row("strategy-deepspeed2", "deepspeed_stage_2 on one device, LoRA, bf16-true", gpu=True, timeout_s=300)
def strategy_deepspeed(a) -> tuple[str, dict]:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise Skip("deepspeed not installed (give gpu_check.sh its wheel: DEEPSPEED_WHEEL=... or --deepspeed)")
    return fit(a, precision="bf16-true", adapter=LORA, strategy="deepspeed_stage_2")


@row("bench-train", f"bench_train.py --device cuda vs HF+peft (LoRA, bf16): MFU >= {MFU_TARGET:.0%}", gpu=True,
     timeout_s=420)  # fmt: skip
def bench(a) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        sizes = [f"--{k.replace('_', '-')}={a.__dict__[k]}" for k in ("hidden", "intermediate", "layers", "heads",
                                                                      "kv_heads", "vocab", "batch", "seq")]  # fmt: skip
        command = [sys.executable, str(SCRIPTS / "bench_train.py"), "--device", "cuda", *sizes, "--modes", "lora-all",
                   "--dtypes", "bf16", "--warmup", "3", "--steps", "10", "--json", str(out)]  # fmt: skip
        subprocess.run(command, check=True, timeout=a.row_timeout_s, stdout=sys.stderr)
        results = {r["contender"]: r for r in json.loads(out.read_text())}
    ours, hf = results["a"], results["c"]
    detail = (f"finetune {ours['tokens_per_s']:.0f} tok/s vs HF+peft {hf['tokens_per_s']:.0f} "
              f"({ours['tokens_per_s'] / hf['tokens_per_s']:.2f}x); peak {ours['peak'] / 2**30:.1f} vs "
              f"{hf['peak'] / 2**30:.1f} GiB; MFU {ours['mfu'] or 0:.1%} vs {hf['mfu'] or 0:.1%}")  # fmt: skip
    if ours["mfu"] is None:
        raise AssertionError(f"{detail}; MFU unknown: no dense bf16 peak for this GPU in bench_train.PEAK_BF16_FLOPS")
    if ours["mfu"] < MFU_TARGET:
        raise AssertionError(detail)
    return detail


def checkpointing_saves_memory(results: dict) -> tuple[str, str]:
    """Derived from the training rows (GPU: their peak memory): checkpointing must lower each setting's peak."""
    pairs = []
    for name, res in results.items():
        gc = results.get(f"{name}-gc")
        if name.startswith("train-") and not name.endswith("-gc") and gc:
            if "peak" not in res.get("data", {}) or "peak" not in gc.get("data", {}):
                return "fail: a training row without its peak memory", ""
            pairs.append((name.removeprefix("train-"), res["data"]["peak"], gc["data"]["peak"]))
    if not pairs:
        return "fail: no training row pair ran", ""
    detail = "; ".join(f"{n}: {a / 2**30:.1f} -> {b / 2**30:.1f} GiB" for n, a, b in pairs)
    return ("pass" if all(b < a for _, a, b in pairs) else "fail"), detail


# -------------------------------------------------------------------------------------------- worker
def worker(a, names: list[str]) -> None:
    """Runs the named rows in this process, each announced (``@@start``) and reported (``@@row``) on stdout."""
    by_name = {r.name: r for r in ROWS}
    out = sys.stdout
    sys.stdout = sys.stderr  # what the rows print goes to the log, not into the protocol
    for name in names:
        print(f"@@start {name}", file=out, flush=True)
        result, detail, data = "pass", "", {}
        try:
            value = by_name[name].fn(a)
            detail, data = value if isinstance(value, tuple) else (value, {})
        except Skip as e:
            result = f"skipped: {e}"
        except BaseException as e:  # noqa: BLE001 (each row in its own try: the report goes on)
            traceback.print_exc()
            result = f"fail: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        print("@@row " + json.dumps({"name": name, "result": result, "detail": detail, "data": data}), file=out,
              flush=True)  # fmt: skip
        if cuda():
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()


def _worker_args(a) -> list[str]:
    timeout = [f"--row-timeout={a.row_timeout}"] if a.row_timeout else []
    return [f"--size={a.size}", f"--folder={a.folder}", f"--steps={a.steps}", *timeout]


def _pump(stream, lines: queue.Queue) -> None:
    """A worker's stdout, line by line, into ``lines``; ``None`` when it closes."""
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_rows(a, rows: list[Row], have_gpu: bool) -> dict[str, dict]:
    """Every row's ``{"result", "detail", "data"}``: GPU rows skipped without a GPU, the others run in workers."""
    results = {r.name: {"result": "skipped: no GPU", "detail": ""} for r in rows if r.gpu and not have_gpu}
    todo = [r for r in rows if r.name not in results]
    by_name = {r.name: r for r in rows}
    end = time.monotonic() + a.budget  # no row runs past it: the table always comes
    while todo:
        if time.monotonic() >= end:
            for r in todo:
                results[r.name] = {"result": f"skipped: the {a.budget} s budget was spent", "detail": ""}
            break
        batch = todo[:1] if a.isolate else todo
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *_worker_args(a),
            "--worker",
            *(r.name for r in batch),
        ]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        current, deadline = None, min(time.monotonic() + START_TIMEOUT_S, end)
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:  # the row (or the worker's start) ran past its time
                proc.kill()
                proc.wait()
                name = current or batch[0].name
                limit = by_name[name].timeout_s if current else START_TIMEOUT_S
                why = "the time budget ran out" if time.monotonic() >= end else f"timed out after {limit} s"
                results[name] = {"result": f"fail: {why}", "detail": ""}
                break
            if line is None:  # the worker ended
                code = proc.wait()
                if current is not None or not any(r.name in results for r in batch):
                    name = current or batch[0].name
                    results[name] = {"result": f"fail: its process died (exit code {code}); see the log", "detail": ""}
                break
            if line.startswith("@@start "):
                current = line.split(maxsplit=1)[1].strip()
                deadline = min(time.monotonic() + by_name[current].timeout_s, end)
            elif line.startswith("@@row "):
                record = json.loads(line[len("@@row ") :])
                results[record.pop("name")] = record
                current, deadline = None, min(time.monotonic() + START_TIMEOUT_S, end)
        todo = [r for r in todo if r.name not in results]
    return results


def table(rows: list[Row], results: dict[str, dict]) -> str:
    lines = ["| claim | result | detail |", "|---|---|---|"]
    for r in rows:
        res = results[r.name]
        cells = (r.claim, res["result"], res["detail"])
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def environment(have_gpu: bool) -> str:
    import torch

    device = torch.cuda.get_device_name() if have_gpu else "no GPU (CPU)"
    return f"{device}; torch {torch.__version__}, CUDA {torch.version.cuda}; {time.strftime('%Y-%m-%d %H:%M %Z')}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), help="model and batch sizes (default: 1b on a GPU, else tiny)")
    p.add_argument("--steps", type=int, help="optimizer steps per training row (default: the size's)")
    p.add_argument("--only", nargs="+", metavar="ROW", help=f"these rows only: {[r.name for r in ROWS]}")
    p.add_argument("--budget", type=float, default=450, help="seconds for all rows (default 450)")
    p.add_argument("--row-timeout", type=int, help="seconds per row, for every row (default: each row's own)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, help="one process per row (default: on GPU)")
    p.add_argument("--folder", help="where the random checkpoint is written (default: a temporary folder)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--worker", nargs="+", metavar="ROW", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    have_gpu = cuda()
    a.size = a.size or ("1b" if have_gpu else "tiny")
    for k, v in SIZES[a.size].items():
        if getattr(a, k, None) is None:
            setattr(a, k, v)
    a.threads, a.compile = os.cpu_count(), False  # for bench_train's helpers
    if a.worker:
        a.row_timeout_s = a.row_timeout or max(r.timeout_s for r in ROWS if r.name in a.worker)
        worker(a, a.worker)
        return 0
    unknown = sorted(set(a.only or ()) - {r.name for r in ROWS})
    if unknown:
        p.error(f"--only: unknown rows {unknown}; known: {[r.name for r in ROWS]}")
    rows = [r for r in ROWS if not a.only or r.name in a.only or r.name == "checkpoint"]
    if a.row_timeout:
        rows = [dataclasses.replace(r, timeout_s=a.row_timeout) for r in rows]
    a.isolate = have_gpu if a.isolate is None else a.isolate
    with tempfile.TemporaryDirectory() as tmp:
        a.folder = a.folder or str(Path(tmp) / "model")
        results = run_rows(a, rows, have_gpu)
    names = [r.name for r in rows]
    if any(n.startswith("train-") for n in names):
        derived = Row("train-gc-memory", "gradient checkpointing lowers peak memory (training rows)", None, True, 0)
        rows.append(derived)
        verdict, detail = checkpointing_saves_memory(results) if have_gpu else ("skipped: no GPU", "")
        results[derived.name] = {"result": verdict, "detail": detail}
    print(f"gpu_check, size {a.size}: {environment(have_gpu)}\n")
    print(table(rows, results))
    if a.json:
        Path(a.json).write_text(json.dumps({r.name: {"claim": r.claim, **results[r.name]} for r in rows}, indent=1))
    failed = [n for n, r in results.items() if r["result"].startswith("fail")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
