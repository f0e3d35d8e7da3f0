"""The `tokenizers` setup that `train_bpe` reproduces merge for merge: the reference the tests and the benchmark
compare against (`tokenizers` comes with `transformers`)."""

from finetune.tokenizer.train import DEFAULT_SPECIAL_TOKENS


def tokenizers_trainer(vocab_size: int, special_tokens=DEFAULT_SPECIAL_TOKENS, min_frequency: int = 2):
    """An untrained `tokenizers.Tokenizer` laid out as ours saves (ByteLevel pre-tokenizer, post-processor and
    decoder) and the `BpeTrainer` with our settings. Train with `tok.train(files, trainer)` or
    `tok.train_from_iterator(texts, trainer)`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    return tok, trainer
