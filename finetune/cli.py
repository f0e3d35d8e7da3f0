"""The ``finetune`` command: ``fit|validate|test|predict`` (LightningCLI over a recipe), ``recipes``, ``export``,
``tokenizer``, ``generate``, ``chat``, ``serve``, ``demo``.

Every command starts fast: this module imports only the standard library, yaml and ``finetune.bundled`` at its top;
torch, Lightning, transformers and peft are imported inside the commands that use them (``finetune --help`` and
``finetune recipes`` import none of them). Keep it so: the LightningCLI class lives in ``finetune.lightning_cli``.
"""

import argparse
import contextlib
import json
import os
import re
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from finetune import bundled


def __getattr__(name: str):
    """``finetune.cli.FinetuneCLI``, imported (with Lightning) on first use."""
    if name == "FinetuneCLI":
        from finetune.lightning_cli import FinetuneCLI

        return FinetuneCLI
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _recipe_args(argv: list[str]) -> list[str]:
    """``--config NAME`` may name a bundled recipe instead of a file."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            out[i + 1] = str(bundled.find(out[i + 1]))
        elif arg.startswith("--config="):
            out[i] = "--config=" + str(bundled.find(arg.split("=", 1)[1]))
    return out


# What a fit writes beside config.yaml: a config.yaml with one of these beside it was read back from a run folder.
RUN_FOLDER_FILES = ("checkpoints", "model_config.json", "tokenizer", "metrics.csv")


def _run_folder_args(argv: list[str]) -> list[str]:
    """A run's own ``config.yaml`` given as ``--config`` runs in the folder it was read from: its saved
    ``trainer.default_root_dir`` names the folder it was written in, which for a copied or moved run folder is
    another run's. So unless the command line sets ``--trainer.default_root_dir``, it is set to the config's
    folder right after that ``--config`` (a later ``--config`` may still set it)."""
    if any(a.split("=", 1)[0] == "--trainer.default_root_dir" for a in argv):
        return list(argv)
    out = []
    for i, arg in enumerate(argv):
        out.append(arg)
        if arg.startswith("--config="):
            path = Path(arg.split("=", 1)[1])
        elif i > 0 and argv[i - 1] == "--config":
            path = Path(arg)
        else:
            continue
        if path.name == "config.yaml" and any((path.parent / f).exists() for f in RUN_FOLDER_FILES):
            out.append(f"--trainer.default_root_dir={path.parent}")
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
        "or a PEFT adapter folder (PeftModel.from_pretrained loads it onto the base), or a run or Hugging Face folder "
        "as a GGUF file with an Ollama Modelfile (llama.cpp, Ollama). Written beside DIR and renamed at the end: a "
        "failure leaves nothing behind.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (trainer.default_root_dir of a fit)")
    parser.add_argument("--ckpt", default="best", help="best (default), last, or a checkpoint path")
    parser.add_argument("--format", required=True, choices=["merged", "adapter", "gguf"])
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0", "q4_0"], default=None,
                        help="gguf: the tensors' type (default f16); q8_0/q4_0 in blocks of 32")  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), help="weights' dtype (default: the base checkpoint's)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    parser.add_argument("--max-shard-size", type=int, default=5 * 2**30, help="bytes per safetensors shard")
    args = parser.parse_args(argv)
    try:
        if args.outtype is not None and args.format != "gguf":
            raise ValueError("--outtype: only with --format gguf (merged/adapter take --dtype)")
        if args.format == "gguf":
            from finetune.export_gguf import export_gguf

            out = export_gguf(args.run_dir, args.out, outtype=args.outtype or "f16", ckpt=args.ckpt,
                              overwrite=args.force)  # fmt: skip
        else:
            out = export(args.run_dir, args.out, format=args.format, ckpt=args.ckpt, dtype=args.dtype,
                         force=args.force, max_shard_size=args.max_shard_size)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, ImportError) as e:
        print(f"finetune export: error: {e}", file=sys.stderr)
        return 2
    print(f"exported ({args.format}): {out}")
    return 0


def _model_args(parser: argparse.ArgumentParser, *, device: bool = True) -> None:
    """MODEL and how to load it, for every command that loads one (loading options, such as quantization, go here);
    ``device``: also ``--device`` (the commands that run the model)."""
    parser.add_argument("model", metavar="MODEL", help="a run folder (its best checkpoint) or a Hugging Face folder")
    parser.add_argument("--ckpt", default="best", help="of a run folder: best (default), last, or a checkpoint path")
    if device:
        parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when there is one)")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    _model_args(parser)
    # Unset sampling flags come from the model's generation_config.json, else the defaults named here.
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the model's, else 128")
    parser.add_argument("--temperature", type=float, default=None, help="0 = greedy (default: the model's, else 0.8)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="sample from the k likeliest (default: model's, else 50)"
    )
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of mass p")
    parser.add_argument("--seed", type=int, default=0, help="the same seed gives the same output (default 0)")


def _quantize_args(parser: argparse.ArgumentParser) -> None:
    """``--quantize int8|int4 [--group-size N]``: weight-only quantization after loading (generate, chat, serve)."""
    parser.add_argument("--quantize", choices=["int8", "int4"], help="quantize the weights after loading: int8 per "
                        "output channel, or int4 in groups (smaller, faster decoding on CPU)")  # fmt: skip
    parser.add_argument("--group-size", type=int, default=None, help="int4: inputs per scale (32 default, 64, 128)")
    parser.add_argument("--quantize-head", action="store_true", help="also quantize the output projection")


def _quant_config(args: argparse.Namespace, bits: int | None = None):
    """The ``QuantConfig`` of ``--quantize``/``--bits`` and ``--group-size`` (None without them)."""
    if bits is None and args.quantize is None:
        if args.group_size is not None:
            raise ValueError("--group-size: only with --quantize int4")
        return None
    from finetune.quant import QuantConfig

    bits = bits or int(args.quantize.removeprefix("int"))
    if bits == 8 and args.group_size is not None:
        raise ValueError("--group-size: int8 has one scale per output channel; give it with int4 only")
    return QuantConfig(bits, args.group_size, head=args.quantize_head)


def quantize_command(argv: list[str]) -> int:
    from finetune import inference
    from finetune.quant import save_quantized

    parser = argparse.ArgumentParser(
        prog="finetune quantize",
        description="Write a model (a run folder or a Hugging Face folder) with weight-only int8 or int4 weights: a "
        "folder that `finetune generate|chat` load quantized as saved. Written beside DIR and renamed at the end.",
    )
    _model_args(parser, device=False)
    parser.add_argument("--bits", type=int, choices=[8, 4], required=True)
    parser.add_argument("--group-size", type=int, default=None, help="4 bits: inputs per scale (32 default, 64, 128)")
    parser.add_argument("--quantize-head", action="store_true", help="also quantize the output projection")
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="replace a non-empty DIR")
    args = parser.parse_args(argv)
    try:
        config = _quant_config(args, bits=args.bits)
        from finetune.folders import check_target

        check_target(Path(args.out), overwrite=args.force, protect=[Path(args.model)])  # before the (long) load
        loaded = inference.load(args.model, ckpt=args.ckpt, quantize=config)
        extra = {"stop_ids": loaded.stop_ids, "chat_template": loaded.chat_template, "source": loaded.source,
                 "document": loaded.document}  # fmt: skip
        out = save_quantized(loaded.model, args.out, tokenizer=loaded.tokenizer, extra=extra, overwrite=args.force,
                             protect=[Path(args.model)])  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as e:
        print(f"finetune quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"quantized ({config.name}): {out}")
    return 0


def attention_command(argv: list[str]) -> int:
    from finetune import inference
    from finetune.attention_maps import write_maps

    parser = argparse.ArgumentParser(
        prog="finetune attention",
        description="Attention maps of a from-scratch model on one prompt: DIR/layer_N.png (a heat map per head, "
        "tokens on the axes) and DIR/attention.npz (the weights, (heads, tokens, tokens) per layer).",
    )
    _model_args(parser, device=False)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--layers", type=lambda s: [int(x) for x in s.split(",")], default=None,
                        metavar="I,J,...", help="layer numbers (default: all)")  # fmt: skip
    parser.add_argument("--out", required=True, metavar="DIR")
    parser.add_argument("--force", action="store_true", help="replace an earlier DIR")
    args = parser.parse_args(argv)
    try:
        from finetune.folders import check_target

        check_target(Path(args.out), overwrite=args.force, protect=[Path(args.model)])
        loaded = inference.load(args.model, ckpt=args.ckpt)
        out = write_maps(loaded, args.prompt, args.out, layers=args.layers, overwrite=args.force)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"finetune attention: error: {e}", file=sys.stderr)
        return 2
    print(f"attention maps: {out}")
    return 0


def _sampling(args: argparse.Namespace, loaded):
    """The flags given, else the model's generation_config.json, else ``Sampling``'s defaults."""
    from dataclasses import replace

    from finetune.inference import Sampling

    flags = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
             "top_p": args.top_p}  # fmt: skip
    sampling = replace(Sampling(seed=args.seed), **loaded.generation)
    sampling = replace(sampling, **{k: v for k, v in flags.items() if v is not None})
    return replace(sampling, top_k=sampling.top_k if sampling.top_k and sampling.top_k > 0 else None)


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


@contextlib.contextmanager
def _terminate_as_exit():
    """SIGTERM raises ``SystemExit(143)`` while the block runs (as SIGINT raises ``KeyboardInterrupt``), so that
    ``finally`` blocks and atomic writes clean up; in the main thread only (where signals are handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def exit_(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, exit_)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def generate_command(argv: list[str]) -> int:
    from finetune import inference
    from finetune.folders import atomic_file

    parser = argparse.ArgumentParser(
        prog="finetune generate",
        description="Continue a prompt with a trained model (a run folder or a Hugging Face folder): one --prompt "
        'printed to stdout, or a JSONL file of {"prompt": ...} rows written as JSONL with an "output" per row.',
    )
    _sampling_args(parser)
    _quantize_args(parser)
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
        if args.out:
            _check_out_file(Path(args.out), Path(args.prompts) if args.prompts else None, force=args.force)
        rows = inference.read_prompts(Path(args.prompts)) if args.prompts else [{"prompt": args.prompt}]
        loaded = inference.load(args.model, ckpt=args.ckpt, device=_device(args), quantize=_quant_config(args))
        sampling = _sampling(args, loaded)
        draft = None
        if args.draft:
            draft = inference.load(args.draft, device=_device(args), what="--draft")
            inference.check_draft(loaded, draft)
        outputs, proposed, accepted = [], 0, 0
        with contextlib.ExitStack() as stack, _terminate_as_exit():
            # --out: rows go to a temporary file beside it as they come, renamed when all are done; an error, ^C or
            # SIGTERM removes it (and a killed run's leftover is removed by the next one)
            sink = stack.enter_context(atomic_file(args.out)) if args.out else None
            for row in rows:
                stream = None
                if args.stream and args.prompt is not None:
                    inference.write_now(row["prompt"] if not loaded.model.is_encoder_decoder else "")
                    stream = inference.TextStream(loaded.tokenizer, inference.write_now)
                text, stats = inference.complete(loaded, row["prompt"], sampling, draft=draft, streamer=stream)
                if stream is not None:
                    stream.end()
                outputs.append({**row, "output": text})
                if sink is not None:
                    sink.write(json.dumps(outputs[-1], ensure_ascii=False) + "\n")
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
    elif args.out:
        print(f"{len(outputs)} outputs written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in outputs))
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
    _quantize_args(parser)
    parser.add_argument("--system", help="a system message opening the conversation")
    args = parser.parse_args(argv)
    stdin = stdin or sys.stdin
    try:
        loaded = inference.load(args.model, ckpt=args.ckpt, device=_device(args), quantize=_quant_config(args))
        chat = inference.Chat(loaded, _sampling(args, loaded), system=args.system)
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
    from finetune.generation import DRAFT_TOKENS
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
    parser.add_argument("--max-tokens-limit", type=int, help="refuse max_tokens over this (400; encoder-decoders: "
                        "default 512)")  # fmt: skip
    parser.add_argument("--max-source-tokens", type=int, help="encoder-decoders (T5): refuse prompts over this many "
                        "tokens (400; default 512)")  # fmt: skip
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds SIGTERM waits for running requests")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=RUN_FOLDER",
                        help="also serve a LoRA run trained on MODEL, unmerged, as NAME (repeatable)")  # fmt: skip
    parser.add_argument("--draft", metavar="SMALL_MODEL", help="a smaller model with the same tokenizer: speculative "
                        "decoding of every batch (same greedy output, fewer passes of MODEL)")  # fmt: skip
    parser.add_argument("--draft-tokens", type=int, default=DRAFT_TOKENS, metavar="K",
                        help=f"tokens the draft proposes per step (default {DRAFT_TOKENS})")  # fmt: skip
    _quantize_args(parser)
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
                     grace=args.grace, adapters=adapters, draft=args.draft,
                     draft_tokens=args.draft_tokens, quantize=_quant_config(args),
                     max_source_tokens=args.max_source_tokens)  # fmt: skip
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
  export MODEL --format gguf --outtype f32|f16|bf16|q8_0|q4_0 --out DIR
                      a run or HF folder (LLaMA/Mistral, GPT-2) as DIR/model.gguf + an Ollama Modelfile
  tokenizer train --files F [F ...] --vocab-size N --out DIR
                      train a byte-level BPE tokenizer (ours; transformers and tokenizers load it)
  generate MODEL --prompt TEXT | --prompts FILE.jsonl [--max-new-tokens --temperature --top-k --top-p --seed
                   --stream --draft SMALL_MODEL]
                      continue prompts with a run folder or a Hugging Face folder
  chat MODEL [--system TEXT]
                      talk to a model through its chat template, the conversation kept in the KV cache
                      (generate and chat: --quantize int8|int4 [--group-size N] quantizes the weights after loading)
  quantize MODEL --bits 8|4 [--group-size N] --out DIR
                      a folder of weight-only int8/int4 weights that generate/chat load as saved
  attention MODEL --prompt TEXT [--layers I,J] --out DIR
                      attention maps: a PNG heat map per layer (a panel per head) and the weights as .npz
  serve MODEL [--host 127.0.0.1 --port 8000 --api-key KEY|--api-key-file F --max-batch N --max-queue N
               --max-tokens-limit N --adapter NAME=RUN_FOLDER ... --draft SMALL_MODEL --draft-tokens K]
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
    commands = {"generate": generate_command, "chat": chat_command, "tokenizer": tokenizer_cli,
                "quantize": quantize_command, "attention": attention_command, "serve": serve_command}  # fmt: skip
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
        argv = _run_folder_args(_adapter_args(_recipe_args(argv)))
    except FileNotFoundError as e:
        print(f"finetune: error: {e}", file=sys.stderr)
        return 2
    from finetune.lightning_cli import FinetuneCLI

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
