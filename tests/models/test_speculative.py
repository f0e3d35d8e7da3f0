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
    assert stats.target_forward_passes == n - stats.accepted  # each pass yields its accepted drafts + 1 token
    assert stats.draft_forward_passes == stats.proposed


@pytest.mark.parametrize("target", ["llama", "gpt2"], indirect=True)
def test_draft_equal_to_target_is_always_accepted(target):
    ids, k = prompt(), 4
    for n in (13, 15):  # 13 = 2 blocks of k + 1 and 3 tokens; 15 = exactly 3 blocks
        ref = generate(target, ids, max_new_tokens=n, eos_token_id=[])
        out, stats = speculative_generate(target, target, ids, max_new_tokens=n, num_draft_tokens=k, eos_token_id=[])
        assert torch.equal(out, ref)
        assert stats.acceptance_rate == 1.0
        assert stats.target_forward_passes == math.ceil(n / (k + 1))


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
CHI2_999 = {2: 13.82, 5: 20.52}


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = counts.sum() * probs
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("top_k", [None, 3])
def test_sampling_keeps_the_targets_distribution(top_k):
    """Over many seeds, the first two tokens follow the target's own distribution (after top-k), not the draft's,
    though the draft proposes most of them: rejections, residual draws and bonus tokens all take part."""
    vocab, n_runs = 6, 600
    # Smaller weights than elsewhere: flatter distributions, so the draft's guesses are often kept, and often not.
    target = random_model("llama", seed=0, vocab=vocab, context=8, scale=1.0)
    draft = random_model("llama", seed=1, width=8, vocab=vocab, context=8, scale=1.0)
    ids = torch.tensor([[1, 4, 2]])

    def dist(model, ids):  # the next-token distribution after each row of ids: (B, T) -> (B, V)
        logits = model(ids)[:, -1]
        if top_k is not None:
            logits = logits.masked_fill(logits < logits.topk(top_k).values[:, -1:], float("-inf"))
        return logits.softmax(-1)

    with torch.no_grad():
        p1, q1 = dist(target, ids)[0], dist(draft, ids)[0]
        after = torch.cat([ids.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)  # prompt + each first token
        p2 = (p1[:, None] * dist(target, after)).sum(0)  # the second token's marginal
    assert (p1 - q1).abs().sum() / 2 > 0.3  # the draft is far from the target: the test can tell them apart
    counts = torch.zeros(2, vocab)
    accepted = 0
    for seed in range(n_runs):
        out, stats = speculative_generate(
            target, draft, ids, max_new_tokens=2, num_draft_tokens=1, temperature=1.0, top_k=top_k, seed=seed,
            eos_token_id=[],
        )  # fmt: skip
        counts[0, out[0, 3]] += 1
        counts[1, out[0, 4]] += 1
        accepted += stats.accepted
    assert 0.1 * n_runs < accepted < 0.9 * n_runs  # both paths taken many times
    support = p1 > 0
    df = int(support.sum()) - 1
    assert (counts[0, ~support] == 0).all()  # nothing outside the target's top-k
    assert chi2(counts[0, support], p1[support]) < CHI2_999[df]
    assert chi2(counts[0, support], q1[support] + 1e-9) > 10 * CHI2_999[df]  # the draft's distribution is rejected
    assert chi2(counts[1], p2) < CHI2_999[5] if top_k is None else (counts[1][p2 == 0] == 0).all()


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
