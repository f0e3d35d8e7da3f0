"""`finetune tokenizer train`: train a byte-level BPE on text files and save it as a Hugging Face tokenizer folder."""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from finetune.tokenizer.train import DEFAULT_SPECIAL_TOKENS

PROG = "finetune tokenizer"


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # report through tokenizer_command instead of exiting
        raise _UsageError(message)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Byte-level BPE tokenizers (ours; tokenizers and transformers load them).")
    sub = parser.add_subparsers(dest="action", metavar="{train}", parser_class=_Parser)
    train = sub.add_parser(
        "train",
        help="train a byte-level BPE on text files",
        description="Train a byte-level BPE (GPT-2 pre-tokenization, the merges tokenizers' BpeTrainer learns) and "
        "write tokenizer.json, tokenizer_config.json and special_tokens_map.json into --out.",
    )
    train.add_argument("--files", nargs="+", required=True, metavar="F", help="UTF-8 text files (one line = one text)")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N", help="bytes + special tokens + merges")
    train.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write the tokenizer into")
    train.add_argument(
        "--special-tokens",
        nargs="+",
        default=list(DEFAULT_SPECIAL_TOKENS),
        metavar="T",
        help="special tokens, ids 0.. in this order; the first is bos/eos/unk, '<pad>' the pad token "
        "(default: <|endoftext|> <pad>)",
    )
    train.add_argument("--min-frequency", type=int, default=2, metavar="K", help="stop when no pair occurs K times")
    train.add_argument("--force", action="store_true", help="write into --out even if it is not empty")
    return parser


def tokenizer_command(argv: list[str]) -> int:
    """Run `finetune tokenizer ...`; returns the exit status (2 with a message on stderr for bad input)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.action is None:
            raise _UsageError("choose an action: train")
        return _train(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (_UsageError, ValueError, OSError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2


def _train(args: argparse.Namespace) -> int:
    from finetune.tokenizer.train import train_bpe

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise _UsageError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise _UsageError(f"--out {out} is not empty (pass --force to write into it)")
    if args.min_frequency < 0:
        raise _UsageError(f"--min-frequency must be >= 0, got {args.min_frequency}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an early stop is reported below
        tok = train_bpe(
            args.files,
            vocab_size=args.vocab_size,
            special_tokens=args.special_tokens,
            min_frequency=args.min_frequency,
        )
    path = tok.save(out)
    info = tok.train_info
    print(
        f"trained a byte-level BPE: vocabulary {info['vocab_size']} of {info['requested_vocab_size']} "
        f"({len(tok.special_tokens)} special + 256 bytes + {info['merges']} merges) from {info['words']:,} "
        f"distinct words in {info['seconds']:.2f}s"
    )
    if info["stopped_early"]:
        print(f"note: stopped early, no pair occurs {args.min_frequency} or more times (see --min-frequency)")
    print(f"saved to {path}")
    return 0
