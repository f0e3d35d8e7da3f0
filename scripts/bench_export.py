"""Memory of a merged LoRA export, ours against HF + PEFT, and the bytes of a QLoRA (NF4) base against bf16.

    python scripts/bench_export.py [--hidden 1024 --layers 16 --heads 16 --intermediate 2816 --vocab 32000]
        [--shard-mb 200 --repeats 3 --threads 2 --workdir DIR --keep]

1. Merged export. A random fp32 LLaMA is saved with ``save_pretrained`` in shards of ``--shard-mb`` (with a tiny
   byte-level tokenizer), one LoRA step (``lora-all-linear``) is trained on it with ``finetune fit``, and the run
   is exported two ways, each in a fresh subprocess:
     - finetune: ``finetune.export.export(run, out, format="merged", ckpt="last", max_shard_size=...)``, which
       streams the output shard by shard;
     - HF + PEFT: ``AutoModelForCausalLM.from_pretrained(base)``, ``PeftModel.from_pretrained(model, adapter)``
       (the adapter folder comes from ``export(..., format="adapter")``), ``merge_and_unload()``,
       ``save_pretrained(out, max_shard_size=...)``.
   Each child first imports the same libraries; a third child only imports them (the baseline). Peak RSS is
   ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end of the child (checked against ``VmHWM``); wall time is the work
   after the imports. The three children run ``--repeats`` times, interleaved, and the median is reported with the
   range (glibc's heap makes peaks vary from run to run). Both outputs are then compared tensor by tensor.
2. QLoRA base. The same checkpoint is loaded into our from-scratch model (``finetune.models.from_hf``); every
   ``nn.Linear`` but ``lm_head`` is counted at 2 bytes a weight (bf16), then quantized with
   ``finetune.quantize.quantize_nf4`` and counted as stored (``finetune.quantize.nbytes``: packed 4-bit weights
   plus the quantization state).

The parent process stays small and does all work in subprocesses: on Linux a child's ``ru_maxrss`` starts from
its parent's peak (it survives ``fork`` and ``exec``), so a large parent would hide the children's own peaks.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 2**20
TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a cat sat on the mat and looked at the moon",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "one two three four five six seven eight nine ten",
]


# ------------------------------------------------------------------------------------------ stages (children)
def make_tokenizer(folder: Path, vocab_size: int = 320):
    """A LLaMA-style byte-level BPE tokenizer (``<s>`` prepended) trained on ``TEXT``, saved into ``folder``."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<s>", "</s>", "<pad>", "<unk>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[(t, tok.token_to_id(t)) for t in specials]
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(folder)
    return fast


def stage_base(a, work: Path) -> dict:
    """A random fp32 LLaMA with a tokenizer, saved in shards of ``--shard-mb``."""
    import torch
    import transformers

    torch.manual_seed(0)
    tok = make_tokenizer(work / "base")
    assert len(tok) <= a.vocab, f"--vocab {a.vocab} is below the tokenizer's {len(tok)}"
    config = transformers.LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.heads, max_position_embeddings=256,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(work / "base", max_shard_size=f"{a.shard_mb}MB")
    params = sum(p.numel() for p in model.parameters())
    shards = len(list((work / "base").glob("*.safetensors")))
    return {"params": params, "shards": shards, "torch": torch.__version__, "transformers": transformers.__version__}


def stage_fit(a, work: Path) -> dict:
    """One LoRA step on the base (``finetune fit``), then the run's adapter folder for the PEFT path."""
    import yaml

    from finetune.cli import main
    from finetune.export import export

    data = work / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXT * 4))
    config = {
        "seed_everything": 0,
        "trainer": {"max_steps": 1, "accelerator": "cpu", "devices": 1, "default_root_dir": str(work / "run"),
                    "enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0,
                    "limit_val_batches": 1, "logger": False},
        "model": {"class_path": "finetune.tasks.CausalLM",
                  "init_args": {"pretrained": str(work / "base"), "backend": "hf", "adapter": "lora-all-linear",
                                "lr": 1e-3}},
        "data": {"format": "text", "train_files": str(data), "validation_files": str(data), "batch_size": 2,
                 "max_length": 32, "cache_dir": str(work / "cache")},
    }  # fmt: skip
    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(recipe)]) == 0, "fit failed"
    export(work / "run", work / "adapter", format="adapter", ckpt="last")
    return {"adapter_mb": (work / "adapter" / "adapter_model.safetensors").stat().st_size / MIB}


def import_libraries() -> None:
    """What both export paths import, so that their baselines are the same."""
    import peft  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import finetune.export  # noqa: F401


def export_ours(a, work: Path) -> None:
    from finetune.export import export

    export(work / "run", work / "ours", format="merged", ckpt="last", max_shard_size=a.shard_mb * 10**6)


def export_hf(a, work: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(work / "base")
    model = PeftModel.from_pretrained(model, work / "adapter").merge_and_unload()
    model.save_pretrained(work / "hf", max_shard_size=f"{a.shard_mb}MB")


EXPORTS = {"imports": lambda a, work: None, "ours": export_ours, "hf": export_hf}


def measured(name: str):
    """A stage that runs ``EXPORTS[name]`` after the imports and reports its peak RSS and wall time."""

    def stage(a, work: Path) -> dict:
        import resource

        import_libraries()
        t0 = time.perf_counter()
        EXPORTS[name](a, work)
        wall = time.perf_counter() - t0
        status = Path("/proc/self/status").read_text().splitlines()
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
        return {"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kib": hwm, "wall_s": wall}

    return stage


def stage_compare(a, work: Path) -> dict:
    """Both merged folders hold the same keys, shapes and dtypes; the largest difference of any value."""
    import torch
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, Path]:
        where = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))  # noqa: SIM118 (safe_open is not a dict)
        return where

    def read(file: Path, key: str) -> torch.Tensor:
        with safe_open(file, framework="pt") as f:
            return f.get_tensor(key)

    ours, hf, base = tensors(work / "ours"), tensors(work / "hf"), tensors(work / "base")
    assert ours.keys() == hf.keys(), f"keys differ: {sorted(ours.keys() ^ hf.keys())[:5]}"
    diff, moved = 0.0, 0.0  # ours vs HF; ours vs the base (the adapter did change the weights)
    for key in ours:
        x, y = read(ours[key], key), read(hf[key], key)
        assert x.shape == y.shape and x.dtype == y.dtype, f"{key}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}"
        diff = max(diff, (x.double() - y.double()).abs().max().item())
        moved = max(moved, (x.double() - read(base[key], key).double()).abs().max().item())
    files = {n: len(list((work / n).glob("*.safetensors"))) for n in ("ours", "hf")}
    return {"tensors": len(ours), "max_abs_diff": diff, "max_abs_vs_base": moved, "shards": files}


def stage_qlora(a, work: Path) -> dict:
    """Bytes of the Linear layers but ``lm_head`` in bf16 and as NF4 (``quantize_nf4``) in our model."""
    from torch import nn

    from finetune.models import from_hf
    from finetune.quantize import nbytes, quantize_nf4

    model = from_hf(work / "base")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] != "lm_head"]
    numel = sum(model.get_submodule(n).weight.numel() for n in names)
    bf16 = numel * 2
    quantize_nf4(model, names)
    nf4 = sum(nbytes(model.get_submodule(n)) for n in names)
    kinds = {type(model.get_submodule(n)).__name__ for n in names}
    return {"layers": len(names), "numel": numel, "bf16_bytes": bf16, "nf4_bytes": nf4, "kinds": sorted(kinds)}


STAGES = {
    "base": stage_base,
    "fit": stage_fit,
    **{name: measured(name) for name in EXPORTS},
    "compare": stage_compare,
    "qlora": stage_qlora,
}


# ------------------------------------------------------------------------------------------ parent
def run_stage(name: str, work: Path) -> dict:
    """Runs one stage in a fresh interpreter (the same arguments) and returns the JSON it prints last."""
    argv = [sys.executable, __file__, *sys.argv[1:], "--stage", name, "--workdir", str(work)]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"stage {name} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {name}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return result


def report(a, base: dict, fit: dict, m: dict[str, list[dict]], same: dict, q: dict) -> None:
    cpus = len(os.sched_getaffinity(0))
    gb = base["params"] * 4 / 1e9
    print(f"{cpus} CPUs, torch {base['torch']}, transformers {base['transformers']}, {a.threads} threads")
    print(f"LLaMA hidden {a.hidden}, {a.layers} layers, {a.heads} heads, intermediate {a.intermediate}, "
          f"vocab {a.vocab}: {base['params'] / 1e6:.0f}M params, {gb:.2f} GB fp32 in {base['shards']} shards "
          f"of {a.shard_mb} MB; LoRA r=16 on all linear layers, adapter {fit['adapter_mb']:.1f} MiB\n")  # fmt: skip

    peaks = {k: [r["maxrss_kib"] / 1024 for r in rs] for k, rs in m.items()}
    imports = statistics.median(peaks["imports"])
    hf_extra = statistics.median(peaks["hf"]) - imports
    print(f"| merged export, fp32, {a.shard_mb} MB shards | peak RSS, median of {a.repeats} | range "
          "| peak - imports | vs HF+PEFT | wall |\n|---|---|---|---|---|---|")  # fmt: skip
    rows = [("imports only", "imports"), ("finetune export (streaming)", "ours"), ("HF + PEFT merge_and_unload", "hf")]
    for label, key in rows:
        peak, span = statistics.median(peaks[key]), f"{min(peaks[key]):.0f}-{max(peaks[key]):.0f}"
        if key == "imports":
            print(f"| {label} | {peak:.0f} MiB | {span} | - | - | - |")
            continue
        wall = statistics.median([r["wall_s"] for r in m[key]])
        print(f"| {label} | {peak:.0f} MiB | {span} | {peak - imports:.0f} MiB | {(peak - imports) / hf_extra:.2f}x "
              f"| {wall:.1f} s |")  # fmt: skip
    # VmHWM is the process's own peak; ru_maxrss would also hold an inherited one (equal up to kernel counter lag)
    off = max(abs(r["maxrss_kib"] - r["vmhwm_kib"]) / r["vmhwm_kib"] for rs in m.values() for r in rs)
    print(f"\nru_maxrss within {off:.1%} of VmHWM in every child. Outputs: {same['tensors']} tensors, shards ours/HF "
          f"{same['shards']['ours']}/{same['shards']['hf']}, max |ours - HF| = {same['max_abs_diff']:.3g} "
          f"(max |merged - base| = {same['max_abs_vs_base']:.3g})\n")  # fmt: skip

    bits = q["nf4_bytes"] * 8 / q["numel"]
    print(f"| QLoRA base: {q['layers']} Linear layers but lm_head, {q['numel'] / 1e6:.0f}M weights "
          "| bytes | bits/weight | vs bf16 |\n|---|---|---|---|")  # fmt: skip
    print(f"| bf16 | {q['bf16_bytes'] / MIB:.1f} MiB | 16.00 | 1.00x |")
    print(f"| NF4 ({'/'.join(q['kinds'])}) | {q['nf4_bytes'] / MIB:.1f} MiB | {bits:.2f} "
          f"| {q['nf4_bytes'] / q['bf16_bytes']:.3f}x |")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in [("hidden", 1024), ("layers", 16), ("heads", 16), ("intermediate", 2816), ("vocab", 32000),
                          ("shard-mb", 200), ("repeats", 3), ("threads", 2)]:  # fmt: skip
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--workdir", type=Path, help="where the models go (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # set in the children
    a = p.parse_args()

    if a.stage is not None:  # a child: one stage, its result as the last line of stdout
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(STAGES[a.stage](a, a.workdir)))
        return

    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench_export-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}", file=sys.stderr)
    try:
        base = run_stage("base", work)
        fit = run_stage("fit", work)
        m = {name: [] for name in EXPORTS}
        for _ in range(a.repeats):  # interleaved
            for name in EXPORTS:
                shutil.rmtree(work / name, ignore_errors=True)
                m[name].append(run_stage(name, work))
        same = run_stage("compare", work)
        q = run_stage("qlora", work)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    report(a, base, fit, m, same, q)


if __name__ == "__main__":
    main()
