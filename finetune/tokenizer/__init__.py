"""A byte-level BPE tokenizer written from scratch: training, encoding and decoding that give the same ids as
Hugging Face `tokenizers`, saved to and loaded from its tokenizer.json format.

    from finetune.tokenizer import ByteLevelBPE, train_bpe

    tok = train_bpe(["corpus.txt"], vocab_size=4096, special_tokens=("<|endoftext|>", "<pad>"))
    tok.save("out/tokenizer")                  # tokenizer.json + tokenizer_config.json + special_tokens_map.json
    ids = ByteLevelBPE.load("out/tokenizer").encode("Hello world")

`transformers.AutoTokenizer.from_pretrained("out/tokenizer")` loads the saved folder too.
"""

from finetune.tokenizer.added import AddedToken
from finetune.tokenizer.bpe import ByteLevelBPE
from finetune.tokenizer.command import tokenizer_command
from finetune.tokenizer.train import train_bpe

__all__ = ["AddedToken", "ByteLevelBPE", "tokenizer_command", "train_bpe"]
