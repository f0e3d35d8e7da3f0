"""KV-cache decoding and generation, against full forwards and HF ``generate``."""

import pytest
import torch
from conftest import V, padded_batch

from finetune.generation import filter_logits, generate
from finetune.models import from_hf

TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "llama-gqa", "mistral-window"])
def test_token_by_token_equals_full_forward(hf_folder, name):
    _, folder = hf_folder(name)
    model = from_hf(folder)
    ids, _ = padded_batch(T=10)
    full = model(ids)
    cache = model.make_cache(ids.size(0), 10)
    steps = [model(ids[:, :3], cache=cache)]  # a prompt chunk, then one token at a time
    steps += [model(ids[:, t : t + 1], cache=cache) for t in range(3, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def test_t5_decoder_cache_equals_full_forward(hf_folder):
    _, folder = hf_folder("t5-v1_1")
    model = from_hf(folder)
    src, src_mask = padded_batch(left=False)
    tgt, _ = padded_batch(T=6, seed=4)
    full = model(src, attention_mask=src_mask, decoder_input_ids=tgt)
    enc = model.encode(src, src_mask)
    cache, cross = model.make_cache(3, 6), model.make_cross_cache(3, src.size(1))
    steps = [
        model.decode(tgt[:, t : t + 1], enc, encoder_mask=src_mask, cache=cache, cross_cache=cross) for t in range(6)
    ]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)


def assert_varied(new_tokens: torch.Tensor) -> None:
    """A reference that repeats one token would only test the first step; every row must change token."""
    for row in new_tokens:
        assert len(set(row.tolist())) >= 2, f"degenerate reference {row.tolist()}"


@pytest.mark.parametrize(
    "name", ["gpt2", "gpt2-unscaled", "llama-gqa", "llama-mqa-tied", "llama3-rope", "qwen2", "mistral-window"]
)
def test_greedy_equals_hf_generate_batched_left_padded(hf_folder, name):
    hf, folder = hf_folder(name)
    ours = from_hf(folder)
    ids, mask = padded_batch(T=7)
    n = 12  # mistral-window: well past its window of 4
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert_varied(ref[:, -n:])
    out = generate(ours, ids, mask, max_new_tokens=n, eos_token_id=[])
    assert torch.equal(out, ref), f"\nours {out[:, -n:].tolist()}\nhf   {ref[:, -n:].tolist()}"
    # One prompt alone gives the same tokens as in the padded batch.
    alone = generate(ours, ids[2:, 4:], max_new_tokens=n, eos_token_id=[])
    assert torch.equal(alone[0, -n:], out[2, -n:])


@pytest.mark.parametrize("name", ["t5-v1_0", "t5-v1_1"])
def test_t5_greedy_equals_hf_generate(hf_folder, name):
    hf, folder = hf_folder(name)
    ours = from_hf(folder)
    src, mask = padded_batch(left=False)
    ref = hf.generate(src, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert_varied(ref[:, 1:])
    out = generate(ours, src, mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(out, ref), f"\nours {out.tolist()}\nhf   {ref.tolist()}"


def test_eos_stops_rows_and_pads_like_hf(hf_folder):
    hf, folder = hf_folder("llama-gqa")
    ours = from_hf(folder)
    ids, mask = padded_batch(T=7)
    free = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=[])[:, 7:]
    eos = int(free[0, 3])  # a token row 0 emits: make it the EOS
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    first = (out[0, 7:] == eos).nonzero()[0, 0]
    assert (out[0, 7 + first + 1 :] == 0).all()  # padded after EOS


def test_stop_token_ids_stop_generation(hf_folder):
    _, folder = hf_folder("gpt2")
    ours = from_hf(folder)
    ids, _ = padded_batch(B=1, T=5)
    free = generate(ours, ids, max_new_tokens=10, eos_token_id=[])[0, 5:].tolist()
    # The first token that was not generated before, at step >= 2: stopping on it must cut the output there.
    step = next(i for i in range(2, 10) if free[i] not in free[:i])
    out = generate(ours, ids, max_new_tokens=10, eos_token_id=[], stop_token_ids=[free[step]])
    assert out[0, 5:].tolist() == free[: step + 1]


def test_sampling_is_reproducible_with_a_seed_and_varies_without(hf_folder):
    _, folder = hf_folder("llama-gqa")
    ours = from_hf(folder)
    ids, mask = padded_batch(T=5)
    kw = dict(max_new_tokens=20, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=[])
    a = generate(ours, ids, mask, seed=7, **kw)
    b = generate(ours, ids, mask, seed=7, **kw)
    c = generate(ours, ids, mask, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_filters_match_hf_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.zeros(4, 1, dtype=torch.long)
    assert torch.equal(filter_logits(logits, top_k=5, top_p=None), TopKLogitsWarper(5)(ids, logits))
    for p in (0.1, 0.5, 0.9):
        assert torch.equal(filter_logits(logits, top_k=None, top_p=p), TopPLogitsWarper(p)(ids, logits))


def test_streamer_sees_every_token(hf_folder):
    _, folder = hf_folder("gpt2")
    ours = from_hf(folder)
    ids, _ = padded_batch(B=2, T=4)
    seen = []
    out = generate(ours, ids, max_new_tokens=6, eos_token_id=[], streamer=seen.append)
    assert torch.equal(torch.stack(seen, dim=1), out[:, 4:])


def test_bad_sampling_arguments_are_refused(hf_folder):
    _, folder = hf_folder("gpt2")
    ours = from_hf(folder)
    ids, _ = padded_batch(B=1, T=4)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(ours, ids, top_p=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        generate(ours, ids, max_new_tokens=0)


def test_cache_overflow_is_an_error():
    from finetune.nn import KVCache

    cache = KVCache(batch_size=1, max_len=4, n_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    cache.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    with pytest.raises(ValueError, match="KV cache is full: 3 \\+ 2 tokens exceed its max_len 4"):
        cache.update(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("arch, field", [("gpt2", "n_positions"), ("llama", "max_position_embeddings")])
def test_prompt_over_the_context_is_refused(stand_in, arch, field):
    model = from_hf(stand_in(arch))  # context 64
    ids = lambda T: torch.randint(3, 300, (1, T))  # noqa: E731
    with pytest.raises(ValueError, match=f"prompt is 64 tokens, at or over the model's context of 64 \\({field}\\)"):
        generate(model, ids(64), max_new_tokens=1)
    msg = f"prompt is 60 tokens and max_new_tokens 8, over the model's context of 64 \\({field}\\): shorten the prompt "
    with pytest.raises(ValueError, match=msg + "or lower max_new_tokens to 4"):
        generate(model, ids(60), max_new_tokens=8)  # no silent truncation to 4 tokens
    assert generate(model, ids(60), max_new_tokens=4, eos_token_id=[]).shape == (1, 64)  # exactly full: fine


def test_t5_has_no_context_limit(hf_folder):
    _, folder = hf_folder("t5-v1_1")
    out = generate(from_hf(folder), torch.randint(3, V, (1, 100)), max_new_tokens=3, eos_token_id=[])
    assert out.shape == (1, 4)


def test_cache_truncate_forgets_the_tail():
    from finetune.nn import KVCache

    cache = KVCache(batch_size=1, max_len=6, n_kv_heads=1, head_dim=2, dtype=torch.float32, device="cpu")
    cache.update(torch.ones(1, 1, 4, 2), torch.ones(1, 1, 4, 2))
    cache.truncate(2)
    k, v = cache.update(torch.full((1, 1, 3, 2), 2.0), torch.full((1, 1, 3, 2), 3.0))
    assert cache.size == 5 and k[0, 0, :, 0].tolist() == [1, 1, 2, 2, 2] and v[0, 0, :, 0].tolist() == [1, 1, 3, 3, 3]
    with pytest.raises(ValueError, match="cannot truncate a KV cache of 5 tokens to 6"):
        cache.truncate(6)


def test_context_length_reads_hf_models_too(hf_folder):
    from finetune.generation import context_length

    assert context_length(hf_folder("gpt2")[0]) == (64, "n_positions")
    assert context_length(hf_folder("llama-gqa")[0]) == (64, "max_position_embeddings")
    assert context_length(hf_folder("t5-v1_1")[0]) is None and context_length(from_hf(hf_folder("t5-v1_1")[1])) is None
