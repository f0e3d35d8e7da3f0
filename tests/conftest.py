"""Tiny random Hugging Face models saved with ``save_pretrained`` into temporary folders: the references."""

import pytest
import torch
import transformers as T

V = 97  # vocabulary of every tiny model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}

# Shared sizes of the tiny configs; each variant below adds only what makes it that variant.
GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
LLAMA = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=64,
)  # fmt: skip
BERT = dict(
    vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
    max_position_embeddings=64,
)  # fmt: skip
T5 = dict(
    vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
    relative_attention_max_distance=16, decoder_start_token_id=0,
)  # fmt: skip

# name -> (config, HF model class). Each variant the issue names has its own entry.
VARIANTS = {
    "gpt2": (T.GPT2Config(**GPT2), T.GPT2LMHeadModel),
    "gpt2-unscaled": (
        T.GPT2Config(**GPT2, scale_attn_weights=False, scale_attn_by_inverse_layer_idx=True),
        T.GPT2LMHeadModel,
    ),
    "llama-gqa": (T.LlamaConfig(**LLAMA, num_key_value_heads=2), T.LlamaForCausalLM),
    "llama-mqa-tied": (T.LlamaConfig(**LLAMA, num_key_value_heads=1, tie_word_embeddings=True), T.LlamaForCausalLM),
    "llama3-rope": (
        T.LlamaConfig(**LLAMA, num_key_value_heads=2, rope_parameters={"rope_theta": 500000.0, **LLAMA3_ROPE}),
        T.LlamaForCausalLM,
    ),
    "llama-linear-rope-bias": (
        T.LlamaConfig(
            **LLAMA,
            attention_bias=True,
            mlp_bias=True,
            head_dim=16,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        ),
        T.LlamaForCausalLM,
    ),  # fmt: skip
    "qwen2": (T.Qwen2Config(**LLAMA, num_key_value_heads=2), T.Qwen2ForCausalLM),
    "mistral-window": (T.MistralConfig(**LLAMA, num_key_value_heads=2, sliding_window=4), T.MistralForCausalLM),
    "bert-mlm": (T.BertConfig(**BERT), T.BertForMaskedLM),
    "bert-mlm-untied": (T.BertConfig(**BERT, tie_word_embeddings=False), T.BertForMaskedLM),
    "bert-cls": (T.BertConfig(**BERT, num_labels=3), T.BertForSequenceClassification),
    "bert-base": (T.BertConfig(**BERT), T.BertModel),
    "t5-v1_0": (T.T5Config(**T5, feed_forward_proj="relu"), T.T5ForConditionalGeneration),
    "t5-deep-decoder": (T.T5Config(**T5, num_decoder_layers=3), T.T5ForConditionalGeneration),
    "t5-v1_1": (
        T.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False),
        T.T5ForConditionalGeneration,
    ),
}
DECODERS = [k for k in VARIANTS if not k.startswith(("bert", "t5"))]
SEEDS = {"gpt2": 2, "t5-v1_0": 9}  # seeds whose tied tiny models do not repeat one token (generation tests)


def make_hf(name: str, seed: int | None = None):
    config, cls = VARIANTS[name]
    torch.manual_seed(SEEDS.get(name, 0) if seed is None else seed)
    model = cls(config).eval()
    if name in ("t5-v1_1", "bert-mlm-untied"):  # transformers 5 ties these on init; untie, as real checkpoints are
        head = model.lm_head if name.startswith("t5") else model.cls.predictions.decoder
        head.weight = torch.nn.Parameter(torch.randn_like(head.weight))
    with torch.no_grad():
        # HF's std-0.02 init makes tiny models emit one token forever; unit-scale weights make greedy outputs
        # vary, so generation comparisons test every step. Biases and norms move off 0/1 so every weight counts.
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 * p.size(-1) ** -0.5)
        for n, p in model.named_parameters():
            if n.endswith(("bias", "norm.weight", "layernorm.weight", "LayerNorm.weight", "layer_norm.weight")):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """``hf_folder(name)`` -> (HF model, folder it was saved to); saved once per session."""
    cache = {}

    def get(name: str):
        if name not in cache:
            model = make_hf(name)
            folder = tmp_path_factory.mktemp(name)
            model.save_pretrained(folder)
            cache[name] = (model, folder)
        return cache[name]

    return get


def padded_batch(B: int = 3, T: int = 9, seed: int = 1, left: bool = True):
    """Random ids and a mask where row i has i * 2 padding tokens (left or right)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for i in range(B):
        if left:
            mask[i, : 2 * i] = 0
        else:
            mask[i, T - 2 * i :] = 0
    return ids, mask


# ----------------------------------------------------------------------------------------------- tokenizers
TOKENIZER_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a cat sat on the mat and looked at the moon",
    "hello world, this is a tiny corpus for a tiny tokenizer",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n",
    "one two three four five six seven eight nine ten positive negative neutral",
]

# name -> (special tokens, post-processor template for one sequence, for a pair, tokenizer_config extras)
TOKENIZER_STYLES = {
    # GPT-2 style: no special tokens added; eos doubles as bos
    "gpt": (["<|endoftext|>", "<pad>"], None, None, dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                                       pad_token="<pad>")),
    # LLaMA style: <s> prepended
    "llama": (["<s>", "</s>", "<pad>", "<unk>"], "<s> $A", "<s> $A <s> $B", dict(bos_token="<s>", eos_token="</s>",
                                                                               pad_token="<pad>", unk_token="<unk>")),
    # BERT style: [CLS] A [SEP] B [SEP], token types, a mask token
    "bert": (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], "[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1",
             dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                  model_input_names=["input_ids", "token_type_ids", "attention_mask"])),
    # T5 style: </s> appended
    "t5": (["<pad>", "</s>", "<unk>"], "$A </s>", "$A </s> $B </s>", dict(pad_token="<pad>", eos_token="</s>",
                                                                         unk_token="<unk>")),
}  # fmt: skip


def make_tokenizer(folder, style: str = "llama", vocab_size: int = 320):
    """A byte-level BPE tokenizer trained on ``TOKENIZER_CORPUS`` with ``tokenizers``, saved with
    ``save_pretrained`` into ``folder`` (so ``AutoTokenizer.from_pretrained(folder)`` loads it). Returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, single, pair, extras = TOKENIZER_STYLES[style]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TOKENIZER_CORPUS, trainer)
    if single is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in specials]
        )
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, **extras)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tokenizer_folder(tmp_path_factory):
    """``tokenizer_folder(style)`` -> folder holding a saved tiny tokenizer of that style (see TOKENIZER_STYLES)."""
    cache = {}

    def get(style: str = "llama"):
        if style not in cache:
            folder = tmp_path_factory.mktemp(f"tok-{style}")
            make_tokenizer(folder, style)
            cache[style] = folder
        return cache[style]

    return get


# -------------------------------------------------------------------------------- tiny stand-ins for recipes
# arch -> (tokenizer style, HF config, HF model class); vocabularies match the tiny tokenizers (320 tokens).
STAND_INS = {
    "gpt2": ("gpt", lambda: T.GPT2Config(**{**GPT2, "vocab_size": 320, "bos_token_id": 0, "eos_token_id": 0}),
             T.GPT2LMHeadModel),
    "llama": ("llama", lambda: T.LlamaConfig(**{**LLAMA, "vocab_size": 320}, num_key_value_heads=2, bos_token_id=0,
                                             eos_token_id=1, pad_token_id=2), T.LlamaForCausalLM),
    "bert": ("bert", lambda: T.BertConfig(**{**BERT, "vocab_size": 320}, pad_token_id=0), T.BertForMaskedLM),
    "t5": ("t5", lambda: T.T5Config(**{**T5, "vocab_size": 320}, pad_token_id=0, eos_token_id=1,
                                    feed_forward_proj="gated-gelu", tie_word_embeddings=False),
           T.T5ForConditionalGeneration),
}  # fmt: skip


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory):
    """``stand_in(arch)`` -> folder with a tiny random HF model and its tokenizer (``save_pretrained`` both), the
    way a hub checkpoint folder looks."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            style, config, cls = STAND_INS[arch]
            folder = tmp_path_factory.mktemp(f"stand-in-{arch}")
            make_tokenizer(folder, style)
            torch.manual_seed(0)
            cls(config()).save_pretrained(folder)
            cache[arch] = folder
        return cache[arch]

    return get


@pytest.fixture(scope="session", autouse=True)
def _finetune_cache(tmp_path_factory):
    """Tokenizers trained for recipes are cached in a temporary folder, not the user's cache."""
    import os

    old = os.environ.get("FINETUNE_CACHE")
    os.environ["FINETUNE_CACHE"] = str(tmp_path_factory.mktemp("finetune-cache"))
    yield
    if old is None:
        os.environ.pop("FINETUNE_CACHE", None)
    else:
        os.environ["FINETUNE_CACHE"] = old
