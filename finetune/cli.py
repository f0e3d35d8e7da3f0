"""The ``finetune`` command: ``fit|validate|test|predict`` (LightningCLI over a recipe), ``recipes``, ``export``,
``tokenizer``, ``generate``, ``chat``, ``serve``, ``demo``."""

import argparse
import json
import os
import pickle
import re
import sys
import tempfile
import time
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger

from finetune import bundled
from finetune.callbacks import (
    AtomicCheckpointIO,
    LastCheckpoint,
    NewEntries,
    RunCSVLogger,
    RunFolder,
    TokensPerSecond,
    checkpoint_error,
)
from finetune.data import DataModule
from finetune.tasks import Task
from finetune.tasks.base import hold_gathered

# Strategies whose checkpoints go through the CheckpointIO plugin (FSDP/DeepSpeed/ModelParallel save their own).
_PLUGIN_STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_find_unused_parameters_true", "single_device")


def demo(args: argparse.Namespace) -> int:
    """Converts a small random Hugging Face LLaMA into our from-scratch model and checks they agree."""
    import torch
    import transformers

    from finetune.generation import generate
    from finetune.models import from_hf, to_hf

    torch.manual_seed(args.seed)
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,  # wider than HF's 0.02, so the random model's greedy output varies
        bos_token_id=1,
        eos_token_id=2,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(f"{tmp}/hf")
        ours = from_hf(f"{tmp}/hf")
        print(
            f"loaded {type(ours).__name__} from a Hugging Face folder: {sum(p.numel() for p in ours.parameters()):,} "
            "parameters"
        )
        prompts = torch.randint(3, config.vocab_size, (2, 12))
        mask = torch.ones_like(prompts)
        mask[1, :4] = 0  # the second prompt is shorter: left padding
        with torch.no_grad():
            diff = (ours(prompts) - hf(prompts).logits).abs().max().item()
        print(f"max |logits - transformers logits| = {diff:.2e}")
        t0 = time.perf_counter()
        out = generate(ours, prompts, mask, max_new_tokens=args.max_new_tokens)
        ours_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = hf.generate(
            prompts,
            attention_mask=mask,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            min_new_tokens=args.max_new_tokens,
            pad_token_id=0,
            eos_token_id=None,
        )
        hf_s = time.perf_counter() - t0
        same = torch.equal(out, ref)
        print(f"greedy tokens (ours):         {out[0, -args.max_new_tokens :].tolist()}")
        print(f"greedy tokens (transformers): {ref[0, -args.max_new_tokens :].tolist()}")
        print(f"identical: {same}; generation {ours_s:.2f}s (ours) vs {hf_s:.2f}s (transformers)")
        to_hf(ours, f"{tmp}/export")
        back = transformers.AutoModelForCausalLM.from_pretrained(f"{tmp}/export")
        with torch.no_grad():
            rt = (back(prompts).logits - hf(prompts).logits).abs().max().item()
        print(f"round trip ours -> to_hf -> transformers: max |diff| = {rt:.2e}")
    return 0 if same and diff < 1e-4 and rt < 1e-4 else 1


def _checkpoint_dir(root: str | None) -> str:
    return str(Path(root or ".") / "checkpoints")


class FinetuneCLI(LightningCLI):
    """LightningCLI over ``Task`` subclasses and the ``DataModule``, writing everything into one run folder
    (``trainer.default_root_dir``): config.yaml, checkpoints/{best,last}.ckpt, metrics.csv, tensorboard/, plots/,
    tokenizer/, model_config.json, data stats, and the metrics of ``validate``/``test`` as JSON."""

    def __init__(self, args=None, run: bool = True) -> None:
        super().__init__(
            model_class=Task,
            subclass_mode_model=True,
            datamodule_class=DataModule,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites the same config
            auto_configure_optimizers=False,  # the task owns its optimizer and schedule
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},  # parse errors are raised; ``main`` prints them in one line
            args=args,
            run=run,
        )

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # No ``--weights_only``: every checkpoint loads with weights_only=True (``_prepare_subcommand_kwargs``).
        return {name: skip | {"weights_only"} for name, skip in LightningCLI.subcommands().items()}

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        # Lightning unpickles remote checkpoints (URLs) with weights_only=False unless told: tell it, for every path.
        return {**super()._prepare_subcommand_kwargs(subcommand), "weights_only": True}

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the hyperparameters of a local --ckpt_path (weights_only=True) while parsing.
        try:
            super()._parse_ckpt_path()
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise checkpoint_error(self.config[self.config.subcommand].get("ckpt_path"), e) from e

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best checkpoint, by a chosen metric
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/loss",
                "checkpoint.mode": "min",
                "checkpoint.filename": "best",
                "checkpoint.save_top_k": 1,
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.enable_version_counter": False,
                "trainer.default_root_dir": "runs/default",
                "trainer.use_distributed_sampler": False,  # the DataModule shards (and resumes) its own order
            }
        )
        parser.add_lightning_class_args(LastCheckpoint, "last_checkpoint")
        for key in ("checkpoint", "last_checkpoint"):
            parser.link_arguments("trainer.default_root_dir", f"{key}.dirpath", compute_fn=_checkpoint_dir)
        parser.link_arguments("model.tokenizer", "data.tokenizer", apply_on="instantiate")
        parser.link_arguments("model.objective", "data.objective", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list):
        root = config.get("default_root_dir") or "."
        if config.get("logger") in (None, True):
            config["logger"] = [
                RunCSVLogger(root),
                TensorBoardLogger(root, name="tensorboard", version="", default_hp_metric=False),
            ]
        strategy = config.get("strategy", "auto")
        if isinstance(strategy, str) and strategy in _PLUGIN_STRATEGIES and not config.get("plugins"):
            config["plugins"] = [AtomicCheckpointIO()]
        callbacks = [*callbacks, RunFolder(), TokensPerSecond()]
        return super()._instantiate_trainer(config, callbacks)

    # ---------------------------------------------------------------------------------------- subcommands
    @property
    def run_dir(self) -> Path:
        return Path(self.trainer.default_root_dir)

    def _resolve_ckpt(self) -> None:
        """``--ckpt_path best|last`` from a new process means ``checkpoints/{best,last}.ckpt`` of the run folder, and
        is refused when that does not exist (a mistyped folder must not train from scratch or evaluate nothing)."""
        cfg = self.config_init[self.subcommand]
        name = cfg.get("ckpt_path")
        if name not in ("best", "last") or (name == "best" and self.trainer.checkpoint_callback.best_model_path):
            return
        path = self.run_dir / "checkpoints" / f"{name}.ckpt"
        if not path.exists():  # a file, or a folder (FSDP2 distributed checkpoint)
            hint = "; to start a new run there, leave out --ckpt_path" if self.subcommand == "fit" else ""
            raise FileNotFoundError(f"--ckpt_path {name}: nothing to load: {path} does not exist{hint}")
        cfg["ckpt_path"] = str(path)

    def before_fit(self) -> None:
        cfg = self.config_init["fit"]
        existing = sorted((self.run_dir / "checkpoints").glob("*.ckpt"))
        if cfg.get("ckpt_path") is None and existing:
            raise FileExistsError(
                f"run folder {self.run_dir} already holds checkpoints ({', '.join(p.name for p in existing)}): "
                "resume it with --ckpt_path last, or start a new run with --trainer.default_root_dir=NEW_FOLDER"
            )
        self._resolve_ckpt()

    def _run_subcommand(self, subcommand: str) -> None:
        """A command that fails before writing a checkpoint takes back what it added to the run folder (config.yaml,
        tensorboard/, ...): the folder itself when it did not exist before, never what was there."""
        added = NewEntries(self.run_dir)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            if self.trainer.is_global_zero:
                added.remove()
            raise

    def after_fit(self) -> None:
        sample = None
        if hasattr(self.model, "sample"):
            # Rank 0 generates alone: under FSDP2 all ranks first gather the weights together (a collective).
            hold_gathered(self.model.model, True)
            try:
                sample = self.model.sample() if self.trainer.is_global_zero else None
            finally:
                hold_gathered(self.model.model, False)
        if not self.trainer.is_global_zero:
            return
        metrics = self.trainer.callback_metrics
        lines = [f"run folder: {self.run_dir}"]
        if "val/loss" in metrics:
            lines.append(f"validation loss: {float(metrics['val/loss']):.4f}")
        best = self.trainer.checkpoint_callback.best_model_path
        if best:
            lines.append(f"best checkpoint: {best}")
        if sample is not None:
            lines.append(f"sample: {sample!r}")
        print("\n".join(lines), flush=True)

    def before_validate(self) -> None:
        self._resolve_ckpt()

    def before_test(self) -> None:
        self._resolve_ckpt()

    def before_predict(self) -> None:
        self._resolve_ckpt()

    def _write_metrics(self, stage: str, prefix: str) -> None:
        if not self.trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(prefix)}
        cfg = self.config_init[self.subcommand]
        out = {"ckpt_path": cfg.get("ckpt_path"), "metrics": values}
        path = self.run_dir / f"{stage}_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"{stage} metrics written to {path}: {json.dumps(values)}", flush=True)

    def after_validate(self) -> None:
        self._write_metrics("validate", "val/")

    def after_test(self) -> None:
        self._write_metrics("test", "test/")

    def predict(self, model, datamodule=None, ckpt_path=None, **kwargs) -> None:
        """Writes ``predictions.jsonl`` (one row per input row, in input order) into the run folder."""
        batches = self.trainer.predict(model, datamodule=datamodule, ckpt_path=ckpt_path, **kwargs) or []
        rows = [r for batch in batches for r in batch]
        if self.trainer.world_size > 1:
            import torch.distributed as dist

            gathered = [None] * self.trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [r for part in gathered for r in part]
        if not self.trainer.is_global_zero:
            return
        rows.sort(key=lambda r: r["row"])
        path = self.run_dir / "predictions.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(f"{len(rows)} predictions written to {path}", flush=True)


def _recipe_args(argv: list[str]) -> list[str]:
    """``--config NAME`` may name a bundled recipe instead of a file."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(bundled.find(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(bundled.find(arg.split("=", 1)[1]))
    return out


def _adapter_args(argv: list[str]) -> list[str]:
    """Lets ``--model.adapter.r=16`` override a preset that a recipe names as a string (``adapter: lora``).

    jsonargparse would replace the string by ``{r: 16}``; so before the first such field, the preset's name is
    given as ``--model.adapter.preset=lora``, into whose mapping the fields then merge (``Task`` reads it).
    """
    out, preset = [], None
    for i, arg in enumerate(argv):
        key, eq, value = arg.partition("=")
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        if key == "--config":
            preset = _recipe_adapter(value) if value else preset
        elif key == "--model.adapter":
            preset = value if value and not value.lstrip().startswith("{") else None
        elif key.startswith("--model.adapter.") and key != "--model.adapter.preset" and isinstance(preset, str):
            out.append(f"--model.adapter.preset={preset}")
            preset = None
        out.append(arg)
    return out


def _recipe_adapter(path: str):
    """A recipe's ``model.adapter`` when it is a preset name (a string), else None."""
    try:
        model = (yaml.safe_load(Path(path).read_text()) or {}).get("model") or {}
    except (OSError, yaml.YAMLError):
        return None  # jsonargparse reports unreadable recipes
    adapter = (model.get("init_args") or model).get("adapter")
    return adapter if isinstance(adapter, str) else None


def export_command(argv: list[str]) -> int:
    from finetune.export import DTYPES, export

    parser = argparse.ArgumentParser(
        prog="finetune export",
        description="Write a run as a merged Hugging Face model folder (AutoModelFor<Task>.from_pretrained loads it) "
        "or a PEFT adapter folder (PeftModel.from_pretrained loads it onto the base). Written beside DIR and renamed "
        "at the end: a failure leaves nothing behind.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (trainer.default_root_dir of a fit)")
    parser.add_argument("--ckpt", default="best", help="best (default), last, or a checkpoint path")
    parser.add_argument("--format", required=True, choices=["merged", "adapter"])
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: the base checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    parser.add_argument("--max-shard-size", type=int, default=5 * 2**30, help="bytes per safetensors shard")
    args = parser.parse_args(argv)
    try:
        out = export(args.run_dir, args.out, format=args.format, ckpt=args.ckpt, dtype=args.dtype,
                     force=args.force, max_shard_size=args.max_shard_size)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"finetune export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported ({args.format}): {out}")
    return 0


def _model_args(parser: argparse.ArgumentParser) -> None:
    """MODEL and how to load it, for generate, chat and serve (loading options, such as quantization, go here)."""
    parser.add_argument("model", metavar="MODEL", help="a run folder (its best checkpoint) or a Hugging Face folder")
    parser.add_argument("--ckpt", default="best", help="of a run folder: best (default), last, or a checkpoint path")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    _model_args(parser)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    parser.add_argument("--top-k", type=int, default=50, help="sample from the k likeliest tokens (default 50)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of mass p")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same output (default 0)")


def _sampling(args: argparse.Namespace):
    from finetune.inference import Sampling

    top_k = args.top_k if args.top_k and args.top_k > 0 else None
    return Sampling(args.max_new_tokens, args.temperature, top_k, args.top_p, args.seed)


def _device(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def _check_out_file(out: Path, prompts: Path | None, *, force: bool) -> None:
    """``generate --out``: never the prompts file itself (even with --force); an existing file only with --force."""
    if not out.exists():
        return
    if prompts is not None and prompts.exists() and out.samefile(prompts):
        raise ValueError(f"--out {out}: is the --prompts file {prompts}; write the outputs to another file")
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give a file path")
    if not force:
        raise FileExistsError(f"--out {out}: exists (pass --force to replace it)")


def generate_command(argv: list[str]) -> int:
    from finetune import inference

    parser = argparse.ArgumentParser(
        prog="finetune generate",
        description="Continue a prompt with a trained model (a run folder or a Hugging Face folder): one --prompt "
        'printed to stdout, or a JSONL file of {"prompt": ...} rows written as JSONL with an "output" per row.',
    )
    _sampling_args(parser)
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the text to continue")
    src.add_argument("--prompts", metavar="FILE.jsonl", help='one {"prompt": ...} per line')
    parser.add_argument("--out", metavar="FILE.jsonl", help="with --prompts: write here (default: stdout)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    parser.add_argument("--stream", action="store_true", help="with --prompt: print tokens as they come")
    parser.add_argument(
        "--draft",
        metavar="MODEL",
        help="a smaller model with the same tokenizer: speculative "
        "decoding (same greedy output, fewer passes of the big model); prints the acceptance rate",
    )
    args = parser.parse_args(argv)
    try:
        sampling = _sampling(args)
        if args.out:
            _check_out_file(Path(args.out), Path(args.prompts) if args.prompts else None, force=args.force)
        rows = inference.read_prompts(Path(args.prompts)) if args.prompts else [{"prompt": args.prompt}]
        loaded = inference.load(args.model, ckpt=args.ckpt, device=_device(args))
        draft = None
        if args.draft:
            draft = inference.load(args.draft, device=_device(args), what="--draft")
            inference.check_draft(loaded, draft)
        outputs, proposed, accepted = [], 0, 0
        for row in rows:
            stream = None
            if args.stream and args.prompt is not None:
                inference.write_now(row["prompt"] if not loaded.model.is_encoder_decoder else "")
                stream = inference.TextStream(loaded.tokenizer, inference.write_now)
            text, stats = inference.complete(loaded, row["prompt"], sampling, draft=draft, streamer=stream)
            if stream is not None:
                stream.end()
            outputs.append({**row, "output": text})
            if stats is not None:
                proposed, accepted = proposed + stats.proposed, accepted + stats.accepted
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"finetune generate: error: {e}", file=sys.stderr)
        return 2
    if args.prompt is not None:
        if args.stream:
            print(flush=True)
        else:
            lead = "" if loaded.model.is_encoder_decoder else args.prompt
            print(lead + outputs[0]["output"], flush=True)
    else:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outputs)
        if args.out:
            out = Path(args.out)
            tmp = out.with_name(f".{out.name}.partial")
            tmp.write_text(lines, encoding="utf-8")
            tmp.replace(out)  # complete or absent
            print(f"{len(outputs)} outputs written to {args.out}", file=sys.stderr)
        else:
            sys.stdout.write(lines)
    if draft is not None:
        rate = accepted / proposed if proposed else 0.0
        print(f"speculative decoding: {accepted}/{proposed} draft tokens accepted ({rate:.1%})", file=sys.stderr)
    return 0


def chat_command(argv: list[str], stdin=None) -> int:
    from finetune import inference

    parser = argparse.ArgumentParser(
        prog="finetune chat",
        description="Talk to a model through its chat template (the run's, the tokenizer's, else ChatML). The "
        "conversation stays in the model's KV cache between turns. Type /reset to start over, /exit (or Ctrl-D) to "
        "leave.",
    )
    _sampling_args(parser)
    parser.add_argument("--system", help="a system message opening the conversation")
    args = parser.parse_args(argv)
    stdin = stdin or sys.stdin
    try:
        loaded = inference.load(args.model, ckpt=args.ckpt, device=_device(args))
        chat = inference.Chat(loaded, _sampling(args), system=args.system)
    except (FileNotFoundError, ValueError) as e:
        print(f"finetune chat: error: {e}", file=sys.stderr)
        return 2
    interactive = stdin.isatty()
    if interactive:
        print(f"chatting with {loaded.source} (/reset, /exit)", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            chat.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if not text.strip():
            continue
        stream = inference.TextStream(loaded.tokenizer, inference.write_now)
        try:
            chat.say(text, streamer=stream)
        except ValueError as e:  # the conversation no longer fits the context
            print(f"\n{e}; /reset to start over", file=sys.stderr)
            continue
        stream.end()
        print(flush=True)


def serve_command(argv: list[str]) -> int:
    from finetune.serving.server import serve

    parser = argparse.ArgumentParser(
        prog="finetune serve",
        description="An OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions, /v1/models, /health, "
        "/metrics) over a run folder or a Hugging Face folder, batching concurrent requests continuously. Prints "
        "the address it listens on; SIGTERM finishes the running requests and exits 0.",
    )
    _model_args(parser)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--api-key", help="require Authorization: Bearer KEY on /v1/*")
    key.add_argument("--api-key-file", metavar="FILE", help="the same, the key read from FILE (not in ps output)")
    parser.add_argument("--name", help="the served model's name (default: MODEL's folder name)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    parser.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond that; more get 429")
    parser.add_argument("--max-tokens-limit", type=int, help="refuse max_tokens over this (400)")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for running requests")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_FOLDER",
                        help="also serve a LoRA run trained on MODEL, unmerged, as NAME (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        adapters = {}
        for spec in args.adapter:
            name, eq, folder = spec.partition("=")
            if not eq or not name or not folder:
                raise ValueError(f"--adapter {spec!r}: expected NAME=RUN_FOLDER")
            if name in adapters:
                raise ValueError(f"--adapter {name}: given twice")
            adapters[name] = folder
        api_key = args.api_key
        if args.api_key_file:
            api_key = Path(args.api_key_file).read_text().strip()
            if not api_key:
                raise ValueError(f"--api-key-file {args.api_key_file}: is empty")
        return serve(args.model, host=args.host, port=args.port, ckpt=args.ckpt, device=_device(args),
                     name=args.name, api_key=api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes,
                     grace=args.grace, adapters=adapters)  # fmt: skip
    except (OSError, ValueError) as e:
        print(f"finetune serve: error: {e}", file=sys.stderr)
        return 2


def tokenizer_cli(argv: list[str]) -> int:
    from finetune.tokenizer import tokenizer_command

    return tokenizer_command(argv)


def recipes_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="finetune recipes", description="list or copy the bundled recipes")
    sub = parser.add_subparsers(dest="action")
    cp = sub.add_parser("cp", help="copy a bundled recipe out to edit it")
    cp.add_argument("name")
    cp.add_argument("dest")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if args.action == "cp":
        print(bundled.copy(args.name, args.dest, force=args.force))
        return 0
    recipes = bundled.bundled()
    width = max(map(len, recipes), default=0)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {bundled.describe(path)}")
    return 0


USAGE = """usage: finetune COMMAND ...

commands:
  fit|validate|test|predict --config RECIPE [--model.X=... --data.Y=... --trainer.Z=...]
                      train or evaluate a recipe (a bundled name or a YAML path); --help on each for every key
  recipes [cp NAME DEST]
                      list the bundled recipes, or copy one out to edit
  export RUN_DIR --format merged|adapter --out DIR [--ckpt best|last|PATH] [--dtype bf16|fp32] [--force]
                      a run as a merged Hugging Face model folder, or as a PEFT adapter folder
  tokenizer train --files F [F ...] --vocab-size N --out DIR
                      train a byte-level BPE tokenizer (ours; transformers and tokenizers load it)
  generate MODEL --prompt TEXT | --prompts FILE.jsonl [--max-new-tokens --temperature --top-k --top-p --seed
                   --stream --draft SMALL_MODEL]
                      continue prompts with a run folder or a Hugging Face folder
  chat MODEL [--system TEXT]
                      talk to a model through its chat template, the conversation kept in the KV cache
  serve MODEL [--host 127.0.0.1 --port 8000 --api-key KEY|--api-key-file F --max-batch N --max-queue N
               --max-tokens-limit N --adapter NAME=RUN_FOLDER ...]
                      an OpenAI-compatible HTTP server, batching concurrent requests continuously
  demo                convert a small random HF LLaMA, check parity with transformers, generate
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    if argv and argv[0] == "recipes":
        return recipes_command(argv[1:])
    if argv and argv[0] == "export":
        return export_command(argv[1:])
    commands = {"generate": generate_command, "chat": chat_command, "tokenizer": tokenizer_cli}
    commands["serve"] = serve_command
    if argv[0] in commands:
        return commands[argv[0]](argv[1:])
    if argv and argv[0] == "demo":
        parser = argparse.ArgumentParser(prog="finetune demo", description=demo.__doc__)
        parser.add_argument("--max-new-tokens", type=int, default=16)
        parser.add_argument("--seed", type=int, default=0)
        return demo(parser.parse_args(argv[1:]))
    # Errors are one message on stderr (exit code 2); --debug or FINETUNE_DEBUG=1 raises them with the traceback.
    debug = "--debug" in argv or os.environ.get("FINETUNE_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    try:
        argv = _adapter_args(_recipe_args(argv))
    except FileNotFoundError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]  # jsonargparse reads the command line from sys.argv
    try:
        FinetuneCLI()
    except Exception as e:
        if debug:
            raise
        print(f"finetune {argv[0]}: error: {_error_message(e, argv)}", file=sys.stderr)
        print("(run with --debug or FINETUNE_DEBUG=1 for the traceback)", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


def _error_message(error: Exception, argv: list[str]) -> str:
    """The message of a fit/validate/test/predict error, without jsonargparse's dump of the values it was given;
    a key that a --config file sets is named with that file."""
    text = str(error).strip() or type(error).__name__
    if "Given value" in text and "Errors:" in text:  # jsonargparse: "Does not validate against any of ..."
        block = text.split("Errors:", 1)[1].split("Given value", 1)[0]
        indent = re.search(r"^( *)- ", block, re.M)
        items = re.split(rf"^{indent.group(1) if indent else ''}- ", block, flags=re.M)[1:]
        reasons = [" ".join(line.strip() for line in item.splitlines() if line.strip()) for item in items]
        reasons = [r for r in reasons if "NoneType" not in r]  # the "or None" of an optional class
        text = "; ".join(reasons) or text.split("\n", 1)[0]
    files = [f for k in re.findall(r"""['"]([A-Za-z_][\w.]*\.[\w.]+)['"]""", text) for f in _files_setting(k, argv)]
    return text + (f" (set in {', '.join(dict.fromkeys(files))})" if files else "")


def _files_setting(key: str, argv: list[str]) -> list[str]:
    """The last --config file of ``argv`` that sets the dotted ``key`` (``init_args`` levels may be left out), when
    the command line itself does not set it."""
    plain = lambda k: k.replace(".init_args.", ".")  # noqa: E731
    if any(plain(a[2:].split("=", 1)[0]) == plain(key) for a in argv if a.startswith("--")):
        return []
    files = [v for k, v in zip(argv, argv[1:], strict=False) if k == "--config"]
    files += [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    out = []
    for file in files:
        try:
            node = yaml.safe_load(Path(file).read_text())
        except (OSError, yaml.YAMLError):
            continue
        for part in key.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif part != "init_args":
                break
        else:
            out.append(file)
    return out[-1:]


if __name__ == "__main__":
    sys.exit(main())
