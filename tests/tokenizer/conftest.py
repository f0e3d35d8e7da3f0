"""Shared corpora and reference tokenizers (built with Hugging Face `tokenizers`) for the tokenizer tests."""

import random
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from finetune.tokenizer.reference import tokenizers_trainer

QUICKSTART = Path(__file__).resolve().parents[2] / "recipes" / "data" / "quickstart" / "train.txt"
SPECIALS = ["<|endoftext|>", "<pad>"]

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Words and separators for multilingual, Unicode-, whitespace- and punctuation-heavy lines.
WORDS = [
    "naïve", "café", "Straße", "über", "déjà", "Привет", "мир", "Γειά", "κόσμε", "日本語", "東京", "中文", "한국어",
    "안녕하세요", "مرحبا", "العالم", "नमस्ते", "שלום", "ไทย", "🙂", "🚀🚀", "👍🏽", "👨‍👩‍👧", "e\u0301", "a\u0308\u0304",
    "x\u0338", "ﬁ", "Ⅻ", "①", "٣٤٥", "１２３", "½", "don't", "it's", "we'll", "THEY'RE", "I'M", "you've", "he'd",
    "'s", "--", "...", "!!", "?!", "$100", "3.14", "2024-01-01", "12345678", "#hash", "@user", "<tag>", "{x}",
    "foo_bar", "C++", "a/b", "100%", "\u00a0", "\u3000", "\u200b", "tab\tsep", "Ω", "ſ", "İ", "\u0558",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", "  ", "\t", "", " \t ", "   "]


def multilingual_lines(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(1, 14)
        s = "".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(k))
        if rng.random() < 0.2:
            s = rng.choice(["  ", "\t", " "]) + s
        if rng.random() < 0.2:
            s += rng.choice(["\r", "  ", " \r", " "])
        out.append(s)
    return out


# Lines every comparison includes: specials embedded, emoji, CJK, combining characters, \r\n, tabs, runs of spaces,
# trailing spaces, digits.
EDGE_LINES = [
    "",
    " ",
    "   ",
    "\n",
    "\r\n",
    "a\r\nb\r\n",
    "tab\there\t\tand  two  spaces   three",
    "trailing spaces   ",
    "  leading spaces",
    "digits 1234567890 and 3.14159 and ١٢٣ and ①②",
    "emoji 🙂🚀 👍🏽 👨‍👩‍👧 family",
    "CJK 日本語のテキスト 中文字符 한국어",
    "combining e\u0301 a\u0308\u0304 x\u0338 Z\u0351\u0352",
    "<|endoftext|>",
    "<|endoftext|><|endoftext|>",
    "start<|endoftext|>middle<pad>end<|endoftext|>",
    " <pad> <pad><pad>  <|endoftext|> ",
    "<|endoftext|>\n<pad>\t<|endoftext|>",
    "<|endoftext|",
    "<pad<pad>>",
    "I'm sure they'll say it's done, we've HE'S",
    "new\nlines\n\n\nmany",
    "mixed\u00a0nbsp\u3000ideographic\u2028line sep",
]


def hf_train_files(files: list[str], vocab_size: int, specials: list[str] = SPECIALS) -> Tokenizer:
    tok, trainer = tokenizers_trainer(vocab_size, specials)
    tok.train([str(f) for f in files], trainer=trainer)
    return tok


def hf_train_texts(texts: list[str], vocab_size: int, specials: list[str] = SPECIALS) -> Tokenizer:
    tok, trainer = tokenizers_trainer(vocab_size, specials)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_split_style(
    files: list[str], pattern: str, *, vocab_size: int = 800, nfc: bool = True, bos_template: bool = True
) -> Tokenizer:
    """A LLaMA-3 / Qwen2 style tokenizer: Split(regex) + ByteLevel(use_regex=False), ignore_merges, NFC."""
    tok = Tokenizer(models.BPE(ignore_merges=True))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[bos, eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train([str(f) for f in files], trainer=trainer)
    byte_level = processors.ByteLevel(trim_offsets=False)
    if bos_template:
        template = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok


@pytest.fixture(scope="session")
def mixed_corpus(tmp_path_factory) -> Path:
    """quickstart/train.txt (1.8 MB of stories) with 6,000 generated multilingual lines mixed in: ~2.2 MB."""
    lines = QUICKSTART.read_text(encoding="utf-8").splitlines() + multilingual_lines(0, 6000)
    random.Random(1).shuffle(lines)
    path = tmp_path_factory.mktemp("corpus") / "mixed.txt"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """~250 kB: stories and multilingual lines, for the tokenizers built with `tokenizers`."""
    lines = QUICKSTART.read_text(encoding="utf-8").splitlines()[:500] + multilingual_lines(2, 2000)
    random.Random(3).shuffle(lines)
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def corpus_lines(mixed_corpus) -> list[str]:
    return mixed_corpus.read_text(encoding="utf-8").splitlines() + EDGE_LINES + multilingual_lines(9, 1000)


@pytest.fixture(scope="session")
def ours_trained(mixed_corpus):
    from finetune.tokenizer import train_bpe

    return train_bpe([mixed_corpus], vocab_size=700)


@pytest.fixture(scope="session")
def hf_trained(mixed_corpus) -> Tokenizer:
    return hf_train_files([mixed_corpus], 700)
