"""KV caches hold memory for what a generation uses (grown on demand, amortized), not the model's whole context."""

import pytest
import torch
import transformers as T
from conftest import LLAMA, padded_batch

from finetune.generation import Session, generate, speculative_generate
from finetune.models import from_hf
from finetune.nn import KVCache

CONTEXT = 4096


@pytest.fixture(scope="module")
def long_llama(tmp_path_factory):
    """(HF model, our model) of a tiny GQA LLaMA with a 4096-position context and unit-scale weights."""
    torch.manual_seed(0)
    hf = T.LlamaForCausalLM(T.LlamaConfig(**{**LLAMA, "max_position_embeddings": CONTEXT}, num_key_value_heads=2))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 2 * p.size(-1) ** -0.5)
    folder = tmp_path_factory.mktemp("llama-4096")
    hf.eval().save_pretrained(folder)
    return hf, from_hf(folder)


def recorded_caches(model, monkeypatch) -> list[list[KVCache]]:
    """Every cache list ``model.make_cache`` hands out from now on, to look at after a generation."""
    made, make = [], model.make_cache
    monkeypatch.setattr(model, "make_cache", lambda *a, **kw: made.append(make(*a, **kw)) or made[-1])
    return made


def kv_bytes(caches: list[KVCache]) -> int:
    return sum(c.nbytes for c in caches)


def test_growth_is_amortized_and_keeps_what_was_written():
    cache = KVCache(batch_size=1, max_len=100, n_kv_heads=1, head_dim=2)
    assert cache.capacity == 0 and cache.nbytes == 0  # nothing before the first write
    storages = set()
    for t in range(100):  # one token at a time, as decoding writes
        k, v = cache.update(torch.full((1, 1, 1, 2), float(t)), torch.full((1, 1, 1, 2), -float(t)))
        storages.add(cache.k.data_ptr())
    assert k[0, 0, :, 0].tolist() == [float(t) for t in range(100)] and v[0, 0, -1, 0] == -99
    assert len(storages) <= 8  # 1, 2, 4, ..., 64, 100: doubling, not a copy per token
    assert cache.capacity == 100 and cache.nbytes == 2 * 100 * 2 * 4
    cache.truncate(3)
    assert cache.capacity == 100  # forgetting frees nothing, so the next turn does not reallocate


def test_cache_takes_the_dtype_and_device_of_what_is_written():
    cache = KVCache(batch_size=2, max_len=8, n_kv_heads=1, head_dim=4)
    cache.update(torch.ones(2, 1, 3, 4, dtype=torch.bfloat16), torch.ones(2, 1, 3, 4, dtype=torch.bfloat16))
    assert cache.k.dtype == cache.v.dtype == torch.bfloat16 and cache.k.shape == (2, 1, 3, 4)
    with pytest.raises(ValueError, match="KV cache max_len must be >= 1, got 0"):
        KVCache(batch_size=1, max_len=0, n_kv_heads=1, head_dim=2)


def test_session_memory_grows_with_the_conversation_not_the_context(long_llama, monkeypatch):
    _, model = long_llama
    made = recorded_caches(model, monkeypatch)
    s = Session(model)
    assert s.max_len == CONTEXT and kv_bytes(made[0]) == 0
    turn1, turn2 = padded_batch(B=1, T=7, seed=1)[0][0].tolist(), padded_batch(B=1, T=5, seed=2)[0][0].tolist()
    answer1 = s.generate(turn1, max_new_tokens=8)
    held = [c.capacity for c in made[0]]
    assert made[0][0].size == len(s) - 1 <= held[0] <= 2 * len(s) < 32 and len(set(held)) == 1  # not 4096
    per_position = 2 * 2 * (32 // 4) * 4  # (k, v) * kv heads * head_dim * fp32 bytes
    assert kv_bytes(made[0]) == len(model.layers) * held[0] * per_position
    answer2 = s.generate(turn2, max_new_tokens=20)
    assert held[0] < len(s) - 1 <= made[0][0].capacity <= 2 * len(s)  # grew with the second turn
    # The answers are those of the whole conversation run from scratch.
    whole = generate(model, torch.tensor([turn1 + answer1 + turn2]), max_new_tokens=20, eos_token_id=[])
    assert answer2 == whole[0, -20:].tolist()


def test_generate_holds_what_it_used_and_equals_hf(long_llama, monkeypatch):
    hf, model = long_llama
    ids, mask = padded_batch(T=7)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    made = recorded_caches(model, monkeypatch)
    out = generate(model, ids, mask, max_new_tokens=12, eos_token_id=[])
    assert torch.equal(out, ref)
    assert made[-1][0].capacity == 7 + 12  # the prompt (7), then doubled, capped at prompt + max_new_tokens
    # Stopped at its first token, a generation of up to 3000 tokens held only the prompt.
    first = int(out[0, 7])
    out = generate(model, ids[:1], max_new_tokens=3000, eos_token_id=first)
    assert out.shape == (1, 8) and made[-1][0].capacity == 7


def test_speculative_caches_grow_with_the_output(long_llama, monkeypatch):
    _, model = long_llama
    ids = padded_batch(B=1, T=6, seed=3)[0]
    free = generate(model, ids, max_new_tokens=30, eos_token_id=[])[0, 6:].tolist()
    eos = next(t for i, t in enumerate(free) if i >= 12 and t not in free[:i])  # ends a block midway or at its end
    made = recorded_caches(model, monkeypatch)
    out, stats = speculative_generate(model, model, ids, max_new_tokens=3000, eos_token_id=eos)
    assert out[0, 6:].tolist() == free[: free.index(eos) + 1] and stats.acceptance_rate == 1.0
    assert [len(m) for m in made] == [2, 2]  # the target's and the draft's caches, one per layer
    for caches in made:
        assert caches[0].size <= caches[0].capacity <= 2 * caches[0].size < 64  # the output's size, not 3006
