"""Speculative decoding: greedy output is the target's own, sampling keeps the target's distribution."""

import math

import pytest
import torch
from conftest import V, padded_batch

from finetune.generation import generate, speculative_generate
from finetune.models import GPT2, GPT2Config, Llama, LlamaConfig, from_hf

TARGETS = {"llama": "llama-gqa", "gpt2": "gpt2"}  # tiny HF models of conftest, unit-scale weights: varied outputs


def random_model(
    arch: str, *, seed: int, layers: int = 1, width: int = 16, vocab: int = V, context: int = 64, scale: float = 2.0
):
    """Our model with random weights of std scale / sqrt(fan_in), built directly: a draft smaller than the target,
    or a tiny-vocab model for the statistical test."""
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
            num_attention_heads=2, max_position_embeddings=context,
        )  # fmt: skip
        model = Llama(config)
    else:
        model = GPT2(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=2, n_positions=context))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, scale * p.size(-1) ** -0.5)
    return model.eval()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models are all per-op overhead: a second thread only adds contention (several times slower on a busy
    machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def target(hf_folder, request):
    return from_hf(hf_folder(TARGETS[request.param])[1])


def prompt(T: int = 6) -> torch.Tensor:
    return padded_batch(B=1, T=T, seed=3)[0]  # (1, T)


@pytest.mark.parametrize("target", ["llama", "gpt2"], indirect=True)
@pytest.mark.parametrize("k", [1, 4])
def test_greedy_equals_plain_greedy_with_a_poor_draft(target, k):
    arch = "llama" if isinstance(target, Llama) else "gpt2"
    draft = random_model(arch, seed=11)  # another random model: it rarely guesses right
    ids = prompt()
    n = 23  # not a multiple of k + 1
    ref = generate(target, ids, max_new_tokens=n, eos_token_id=[])
    out, stats = speculative_generate(target, draft, ids, max_new_tokens=n, num_draft_tokens=k, eos_token_id=[])
    assert torch.equal(out, ref), f"\nspeculative {out[0, 6:].tolist()}\nplain       {ref[0, 6:].tolist()}"
    assert stats.acceptance_rate < 0.5
    # the prefill yields the first token, each later pass its accepted drafts + 1 token
    assert stats.target_forward_passes == n - stats.accepted
    assert stats.draft_forward_passes == stats.proposed + 1  # + the draft's read of the prompt


@pytest.mark.parametrize("target", ["llama", "gpt2"], indirect=True)
def test_draft_equal_to_target_is_always_accepted(target):
    ids, k = prompt(), 4
    for n in (13, 15):  # 13 = 2 blocks of k + 1 and 3 tokens; 15 = exactly 3 blocks
        ref = generate(target, ids, max_new_tokens=n, eos_token_id=[])
        out, stats = speculative_generate(target, target, ids, max_new_tokens=n, num_draft_tokens=k, eos_token_id=[])
        assert torch.equal(out, ref)
        assert stats.acceptance_rate == 1.0
        assert stats.target_forward_passes == 1 + math.ceil((n - 1) / (k + 1))  # the prefill, then blocks


@pytest.mark.parametrize("target", ["llama", "gpt2"], indirect=True)
@pytest.mark.parametrize("same", [True, False])
def test_eos_mid_block_stops_like_plain_greedy(target, same):
    arch = "llama" if isinstance(target, Llama) else "gpt2"
    draft = target if same else random_model(arch, seed=11)
    ids = prompt()
    free = generate(target, ids, max_new_tokens=20, eos_token_id=[])[0, 6:].tolist()
    # The first token not generated before, at step 7 or later: with k = 4 it falls inside a block, not at its end.
    step = next(i for i in range(7, 20) if free[i] not in free[:i] and (i + 1) % 5)
    eos = free[step]
    ref = generate(target, ids, max_new_tokens=20, eos_token_id=eos)
    seen = []
    out, _ = speculative_generate(target, draft, ids, max_new_tokens=20, eos_token_id=eos, streamer=seen.append)
    assert torch.equal(out, ref) and out[0, 6:].tolist() == free[: step + 1]
    assert torch.cat(seen).tolist() == free[: step + 1]  # every token streamed once, in order, up to the EOS
    # stop_token_ids stop it too
    out, _ = speculative_generate(target, draft, ids, max_new_tokens=20, eos_token_id=[], stop_token_ids=[eos])
    assert torch.equal(out, ref)


@pytest.mark.parametrize("target", ["llama"], indirect=True)
def test_seeded_sampling_is_reproducible(target):
    draft, ids = random_model("llama", seed=11), prompt()
    kw = dict(max_new_tokens=20, temperature=1.0, top_k=40, top_p=0.95, eos_token_id=[])
    a, sa = speculative_generate(target, draft, ids, seed=5, **kw)
    b, sb = speculative_generate(target, draft, ids, seed=5, **kw)
    c, _ = speculative_generate(target, draft, ids, seed=6, **kw)
    assert torch.equal(a, b) and sa == sb and not torch.equal(a, c)
    assert a.shape == (1, 26) and sa.proposed > 0


# Chi-square critical values at p = 0.001 by degrees of freedom: a correct sampler fails one seeded run in 1000.
CHI2_999 = {2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


def follows(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Whether ``counts`` (V,) pass a chi-square test against ``probs`` (V,), nothing drawn outside its support."""
    support = probs > 0
    return (
        bool((counts[~support] == 0).all()) and chi2(counts[support], probs[support]) < CHI2_999[int(support.sum()) - 1]
    )


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampling_keeps_the_targets_distribution(top_k):
    """Over many seeds, the first three tokens follow the target's own distribution (after top-k), not the draft's,
    though the draft proposes the second: the target's first token, rejections, residual draws and bonus tokens all
    take part."""
    vocab, n_runs = 6, 600
    # Smaller weights than elsewhere: flatter distributions, so the draft's guesses are often kept, and often not.
    target = random_model("llama", seed=0, vocab=vocab, context=8, scale=1.0)
    draft = random_model("llama", seed=1, width=8, vocab=vocab, context=8, scale=1.0)
    ids = torch.tensor([[1, 4, 2]])

    def dist(model, prefixes):  # the next-token distribution after each row of prefixes: (B, T) -> (B, V)
        logits = model(prefixes)[:, -1]
        if top_k is not None:
            logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
        return logits.softmax(-1)

    def extended(prefixes):  # every row of prefixes followed by every token: (B, T) -> (B * V, T + 1)
        B = prefixes.size(0)
        return torch.cat([prefixes.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(B)[:, None]], dim=1)

    with torch.no_grad():
        p1 = dist(target, ids)[0]  # (V,)
        P2, Q2 = dist(target, extended(ids)), dist(draft, extended(ids))  # (V, V): after the prompt + each token
        p2, q2 = p1 @ P2, p1 @ Q2  # the second token's marginal, and what it would be were every draft kept
        P3 = dist(target, extended(extended(ids)))  # (V * V, V)
        p3 = (p1[:, None] * P2).reshape(-1) @ P3  # the third token's marginal
    assert (p2 - q2).abs().sum() / 2 > 0.2  # the draft is far from the target: the test can tell them apart
    counts = torch.zeros(3, vocab)
    accepted = 0
    for seed in range(n_runs):
        out, stats = speculative_generate(
            target, draft, ids, max_new_tokens=3, num_draft_tokens=1, temperature=1.0, top_k=top_k, seed=seed,
            eos_token_id=[],
        )  # fmt: skip
        for i in range(3):
            counts[i, out[0, 3 + i]] += 1
        accepted += stats.accepted
    assert 0.1 * n_runs < accepted < 0.9 * n_runs  # both paths taken many times
    assert follows(counts[0], p1) and follows(counts[1], p2) and follows(counts[2], p3)
    assert not follows(counts[1], q2)  # the draft's distribution is rejected


def test_bad_arguments_are_refused(hf_folder):
    target = from_hf(hf_folder("llama-gqa")[1])
    ids = prompt()
    with pytest.raises(ValueError, match=r"draft's vocabulary \(50 tokens\) differs from the target's \(97\)"):
        speculative_generate(target, random_model("llama", seed=1, vocab=50), ids, max_new_tokens=4)
    with pytest.raises(ValueError, match=r"one prompt: input_ids of shape \(1, T\), got \(2, 6\)"):
        speculative_generate(target, target, ids.expand(2, -1), max_new_tokens=4)
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 1"):
        speculative_generate(target, target, ids, max_new_tokens=4, num_draft_tokens=0)
    t5 = from_hf(hf_folder("t5-v1_1")[1])
    with pytest.raises(ValueError, match="decoder-only models; the draft is an encoder-decoder"):
        speculative_generate(target, t5, ids, max_new_tokens=4)
    short = random_model("llama", seed=1, context=16)
    with pytest.raises(ValueError, match="over the draft model's context of 16"):
        speculative_generate(target, short, ids, max_new_tokens=20)
