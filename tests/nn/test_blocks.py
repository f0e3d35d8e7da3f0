"""Each building block alone, against a hand computation or the matching ``transformers`` module."""

import math

import pytest
import torch
import torch.nn.functional as F
import transformers as T
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.t5 import modeling_t5 as hf_t5

from finetune.nn import (
    MLP,
    Attention,
    GatedMLP,
    KVCache,
    LayerNorm,
    PostNormBlock,
    PreNormBlock,
    RMSNorm,
    RotaryEmbedding,
    SinusoidalPositions,
    T5RelativeBias,
    apply_rotary,
    build_mask,
    relative_position_bucket,
    rope_inv_freq,
)
from finetune.nn.attention import sdpa
from finetune.nn.mlp import gelu_tanh

TOL = dict(atol=1e-6, rtol=1e-5)
g = torch.Generator().manual_seed(0)


def randn(*shape):
    return torch.randn(*shape, generator=g)


# ------------------------------------------------------------------------------------------ attention
def reference_attention(attn: Attention, x, *, context=None, mask=None, scale=None):
    """Written out: per-head softmax(q k^T * scale + mask) v, with key/value heads repeated for GQA."""
    B, T, _ = x.shape
    src = x if context is None else context
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, T, H, D).transpose(1, 2)
    k = attn.k_proj(src).view(B, src.size(1), Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    v = attn.v_proj(src).view(B, src.size(1), Hkv, D).transpose(1, 2).repeat_interleave(H // Hkv, dim=1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(D))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    y = scores.softmax(-1) @ v
    return attn.o_proj(y.transpose(1, 2).reshape(B, T, H * D))


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_attention_variants_match_written_out_attention(n_kv_heads):
    attn = Attention(dim=16, n_heads=4, n_kv_heads=n_kv_heads, qkv_bias=True)
    x = randn(2, 5, 16)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()
    torch.testing.assert_close(attn(x, is_causal=True), reference_attention(attn, x, mask=causal), **TOL)
    torch.testing.assert_close(attn(x), reference_attention(attn, x), **TOL)
    assert attn.k_proj.out_features == n_kv_heads * 4


def test_padding_mask_hides_padded_keys():
    attn = Attention(dim=16, n_heads=4)
    x = randn(2, 6, 16)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask, is_causal = build_mask(q_len=6, k_len=6, padding_mask=pad, causal=True)
    assert not is_causal and mask.shape == (2, 1, 6, 6)
    out = attn(x, mask=mask)
    # Row 0's real tokens give what the unpadded sequence gives alone.
    torch.testing.assert_close(out[0, 2:], attn(x[:1, 2:], is_causal=True)[0], **TOL)
    assert not out.isnan().any()  # padding queries, which see no key, do not produce NaN


@pytest.mark.parametrize("n_kv_heads", [2, 1], ids=["GQA", "MQA"])
def test_masked_gqa_repeats_kv_heads_instead_of_enable_gqa(n_kv_heads, monkeypatch):
    """On CUDA enable_gqa runs only in the flash kernel, which takes no mask: a masked GQA call must give SDPA
    repeated K/V (all n_heads) and no enable_gqa, so a kernel that takes masks can run; unmasked calls keep it."""
    attn = Attention(dim=16, n_heads=4, n_kv_heads=n_kv_heads)
    x = randn(2, 6, 16)
    calls, sdpa = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((k.size(1), kw["attn_mask"] is not None, kw["enable_gqa"]))  # (K/V heads, masked, enable_gqa)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    unmasked = attn(x, is_causal=True)
    all_true, _ = build_mask(q_len=6, k_len=6, causal=True, materialize=True)  # the causal mask, written out
    torch.testing.assert_close(attn(x, mask=all_true), unmasked, **TOL)
    pad = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    mask, _ = build_mask(q_len=6, k_len=6, padding_mask=pad, causal=True)
    padded = attn(x, mask=mask)
    torch.testing.assert_close(padded, reference_attention(attn, x, mask=mask), **TOL)
    torch.testing.assert_close(padded[0, 2:], attn(x[:1, 2:], is_causal=True)[0], **TOL)
    assert calls == [(n_kv_heads, False, True), (4, True, False), (4, True, False), (n_kv_heads, False, True)]


@pytest.mark.parametrize("masked", [False, True], ids=["causal", "packed-mask"])
def test_bf16_attention_on_the_cpu_runs_sdpa_in_fp32_when_training(masked, monkeypatch):
    """With gradients, bf16 q/k/v on the CPU go through the flash kernel in fp32 (its bf16 backward is slow there):
    the output is the fp32 SDPA's rounded to bf16, and the gradients are at least as close to a float64 reference
    as the bf16 kernel's. Without gradients, and for fp32 or non-CPU inputs, SDPA gets the tensors as they are."""
    torch.manual_seed(0)
    attn = Attention(dim=32, n_heads=4, n_kv_heads=2).to(torch.bfloat16)
    x = randn(2, 9, 32).bfloat16()
    seg = torch.tensor([[1] * 4 + [2] * 5, [1] * 9])
    mask, is_causal = build_mask(q_len=9, k_len=9, segment_ids=seg if masked else None, causal=True)
    q = attn._heads(attn.q_proj(x), 4).detach()  # (B, H, T, D)
    k, v = attn._heads(attn.k_proj(x), 2).detach(), attn._heads(attn.v_proj(x), 2).detach()
    grad = randn(2, 4, 9, 8).bfloat16()
    kw = dict(attn_mask=mask, is_causal=is_causal, enable_gqa=True)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = fn(*leaves)
        out.backward(grad.to(out.dtype))
        return out, [t.grad for t in leaves]

    out, grads = run(lambda *t: sdpa(*t, **kw), torch.bfloat16)
    fp32, _ = run(lambda *t: F.scaled_dot_product_attention(*t, **kw), torch.float32)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()

    def written_out(q, k, v):  # float64 throughout
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)  # (B, H, S, D)
        scores = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~(causal if mask is None else mask), -math.inf)
        return scores.softmax(-1) @ v

    exact, exact_grads = run(written_out, torch.float64)
    bf16, bf16_grads = run(lambda *t: F.scaled_dot_product_attention(*t, **kw), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, fp32.bfloat16())
    for g, g_bf16, g_exact in zip(grads, bf16_grads, exact_grads, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.double() - g_exact).abs().mean() <= (g_bf16.double() - g_exact).abs().mean()
        torch.testing.assert_close(g.double(), g_exact, atol=2e-2, rtol=2e-2)

    # The module: its output is this output projected, and gradients reach the input and every weight.
    x = x.requires_grad_()
    attn(x, mask=mask, is_causal=is_causal).sum().backward()
    assert x.grad.abs().sum() > 0 and all(p.grad.abs().sum() > 0 for p in attn.parameters())

    seen, sdpa_ = [], F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((q.dtype, q.device.type))
        return sdpa_(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    attn(x, is_causal=True)  # training, bf16, CPU: the flash kernel in fp32, not F.scaled_dot_product_attention
    with torch.no_grad():
        attn(x, is_causal=True)  # inference (decoding): bf16 kept
    attn.float()(x.float(), is_causal=True)  # fp32: as it is
    meta = Attention(dim=32, n_heads=4).to("meta")  # stands in for CUDA: any device but the CPU
    meta.bfloat16()(torch.empty(2, 9, 32, dtype=torch.bfloat16, device="meta", requires_grad=True), is_causal=True)
    assert seen == [(torch.bfloat16, "cpu"), (torch.float32, "cpu"), (torch.bfloat16, "meta")]


def test_bf16_attention_with_dropout_or_a_learned_bias_runs_sdpa_in_fp32():
    """Attention dropout and a bias that needs its gradient (T5's) are not in the flash kernel: SDPA runs in fp32
    through autograd, so the bias gets its gradient."""
    q, k, v = (randn(2, 4, 6, 8).bfloat16().requires_grad_() for _ in range(3))
    bias = randn(1, 4, 6, 6).bfloat16().requires_grad_()
    out = sdpa(q, k, v, attn_mask=bias)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float()).bfloat16()
    assert torch.equal(out, ref)
    out.sum().backward()
    assert bias.grad is not None and bias.grad.abs().sum() > 0
    torch.manual_seed(0)
    dropped = sdpa(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=0.5).bfloat16()
    assert torch.equal(dropped, ref)


def test_cross_attention_with_context_and_mask():
    attn = Attention(dim=16, n_heads=4, n_kv_heads=2, kv_dim=8)
    x, ctx = randn(2, 3, 16), randn(2, 7, 8)
    key_mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3]).bool()[:, None, None, :]
    ref = reference_attention(attn, x, context=ctx, mask=key_mask.expand(2, 4, 3, 7))
    torch.testing.assert_close(attn(x, context=ctx, mask=key_mask), ref, **TOL)
    cache = KVCache(batch_size=2, max_len=7, n_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    first = attn(x, context=ctx, mask=key_mask, cache=cache)
    again = attn(x, context=ctx * 0, mask=key_mask, cache=cache)  # the cache holds the encoder K/V now
    torch.testing.assert_close(first, ref, **TOL)
    torch.testing.assert_close(again, ref, **TOL)


def test_kv_cache_decoding_equals_full_causal_pass():
    attn = Attention(dim=16, n_heads=4, n_kv_heads=2)
    x = randn(2, 6, 16)
    full = attn(x, is_causal=True)
    cache = KVCache(batch_size=2, max_len=8, n_kv_heads=2, head_dim=4, dtype=torch.float32, device="cpu")
    steps = [attn(x[:, :2], is_causal=True, cache=cache)]
    for t in range(2, 6):
        mask, causal = build_mask(q_len=1, k_len=t + 1, causal=True)
        steps.append(attn(x[:, t : t + 1], mask=mask, is_causal=causal, cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full, **TOL)
    assert cache.size == 6 and cache.k.shape == (2, 2, 8, 4)


def test_build_mask_sliding_window_and_fast_path():
    mask, is_causal = build_mask(q_len=5, k_len=5, causal=True)
    assert mask is None and is_causal  # SDPA's own causal kernel
    mask, _ = build_mask(q_len=5, k_len=5, causal=True, sliding_window=2)
    expected = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    assert torch.equal(mask[0, 0], expected.bool())
    mask, _ = build_mask(q_len=2, k_len=5, causal=True, materialize=True)  # 3 cached + 2 new
    assert torch.equal(mask[0, 0].int(), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]))


def test_attention_rejects_bad_head_counts():
    with pytest.raises(ValueError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        Attention(dim=24, n_heads=6, n_kv_heads=4)
    with pytest.raises(ValueError, match=r"dim \(10\) must be divisible by n_heads \(4\)"):
        Attention(dim=10, n_heads=4)


# ------------------------------------------------------------------------------------------ positions
def test_sinusoidal_positions_match_the_formula():
    pe = SinusoidalPositions(max_positions=50, dim=8)
    for pos in (0, 1, 17, 49):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert pe.table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert pe.table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert pe(torch.tensor([[3, 4]])).shape == (1, 2, 8)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
        {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_frequencies_and_rotation_match_hf(rope):
    config = T.LlamaConfig(hidden_size=512, num_attention_heads=8, rope_parameters=rope)
    hf_rope = hf_llama.LlamaRotaryEmbedding(config)
    scaling = None if rope["rope_type"] == "default" else {k: v for k, v in rope.items() if k != "rope_theta"}
    torch.testing.assert_close(rope_inv_freq(64, theta=rope["rope_theta"], scaling=scaling), hf_rope.inv_freq)
    ours = RotaryEmbedding(head_dim=64, theta=rope["rope_theta"], scaling=scaling)
    pos = torch.tensor([[0, 1, 2, 100, 5000, 30000]])
    x = randn(1, 8, 6, 64)
    cos, sin = ours(pos, torch.float32)
    hf_cos, hf_sin = hf_rope(x, pos)
    torch.testing.assert_close(cos, hf_cos)
    torch.testing.assert_close(sin, hf_sin)
    q, k = hf_llama.apply_rotary_pos_emb(x, x, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rotary(x, cos, sin), q)


TABLES = {
    "rope-default": lambda: RotaryEmbedding(head_dim=64, theta=10000.0),
    "rope-linear": lambda: RotaryEmbedding(head_dim=64, theta=10000.0, scaling={"rope_type": "linear", "factor": 4.0}),
    "rope-llama3": lambda: RotaryEmbedding(
        head_dim=64,
        theta=500000.0,
        scaling={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    ),
    "sinusoidal": lambda: SinusoidalPositions(max_positions=64, dim=8),
}


@pytest.mark.parametrize("make", TABLES.values(), ids=TABLES.keys())
@pytest.mark.parametrize("cast", ["to-bf16", "half", "bfloat16-in-a-parent", "to-meta-bf16", "data-bf16"])
def test_position_tables_stay_fp32_under_module_casts(make, cast):
    """bf16-true, FSDP and ``model.half()`` cast every floating buffer through ``_apply``; HF keeps RoPE's inv_freq
    fp32, so must we (a bf16 inv_freq is 0.3% off: whole radians at position 1000)."""
    module = make()
    name = "inv_freq" if isinstance(module, RotaryEmbedding) else "table"
    exact = getattr(module, name).clone()
    parent = torch.nn.Sequential(torch.nn.Linear(4, 4), module)  # the cast reaches the table through a parent
    if cast == "to-bf16":
        module.to(torch.bfloat16)
    elif cast == "half":
        module.half()
    elif cast == "bfloat16-in-a-parent":
        parent.bfloat16()
        assert parent[0].weight.dtype == torch.bfloat16  # the parameters do follow the cast
    elif cast == "to-meta-bf16":
        module.to("meta", torch.bfloat16)
    else:  # FSDP1's buffer_dtype: `buffer.data = buffer.to(dtype)`, past _apply; the next forward recomputes it
        getattr(module, name).data = getattr(module, name).data.bfloat16()
        module(torch.tensor([[0, 1]]), torch.bfloat16)
    table = getattr(module, name)
    assert table.dtype == torch.float32
    if cast == "to-meta-bf16":
        assert table.device.type == "meta"  # the move is kept, only the cast is undone
    else:
        assert torch.equal(table, exact)
    assert name not in module.state_dict()  # derived, never saved: checkpoints load as before


def test_sinusoidal_positions_in_the_embeddings_dtype():
    pe = SinusoidalPositions(max_positions=50, dim=8).bfloat16()
    pos = torch.tensor([[3, 49]])
    assert pe(pos, torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(pe(pos, torch.bfloat16), pe.table[pos].bfloat16())  # rounded once, from the fp32 table


def test_rope_cos_sin_from_a_bf16_module_equal_hf_in_bf16():
    """Angles in fp32, cos/sin cast to the activation dtype, as HF's rotary embedding (which keeps fp32 inv_freq)."""
    config = T.LlamaConfig(hidden_size=512, num_attention_heads=8, max_position_embeddings=4096)
    hf_rope = hf_llama.LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(head_dim=64, theta=10000.0).to(torch.bfloat16)
    pos = torch.arange(1000, 4096)[None]
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.bfloat16), pos)
    cos, sin = ours(pos, torch.bfloat16)
    assert cos.dtype == torch.bfloat16 and torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)


def test_unknown_rope_type_is_named():
    with pytest.raises(ValueError, match="unsupported rope_type 'yarn'; supported"):
        rope_inv_freq(64, theta=1e4, scaling={"rope_type": "yarn", "factor": 2.0})


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_buckets_and_bias_match_hf(bidirectional):
    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    ours = relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    hf = hf_t5.T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=32, max_distance=128)
    assert torch.equal(ours, hf)
    config = T.T5Config(d_model=16, d_kv=4, num_heads=4, is_decoder=not bidirectional)
    hf_attn = hf_t5.T5Attention(config, has_relative_attention_bias=True)
    bias = T5RelativeBias(n_heads=4, bidirectional=bidirectional)
    bias.relative_attention_bias.weight.data.copy_(hf_attn.relative_attention_bias.weight)
    torch.testing.assert_close(bias(3, 9, offset=6), hf_attn.compute_bias(3, 9, past_seen_tokens=6))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_at_per_row_positions_equals_the_offset_call_row_by_row(bidirectional):
    """Rows decoded together at their own lengths (the serving engine's slot cache): row b's queries at
    ``offsets[b] ..`` over keys ``0 .. K`` get exactly the bias of the (q_len, k_len, offset) call, which is HF's."""
    config = T.T5Config(d_model=16, d_kv=4, num_heads=4, is_decoder=not bidirectional)
    hf_attn = hf_t5.T5Attention(config, has_relative_attention_bias=True)
    bias = T5RelativeBias(n_heads=4, bidirectional=bidirectional)
    bias.relative_attention_bias.weight.data.copy_(hf_attn.relative_attention_bias.weight)
    offsets, T_, K = [0, 5, 140, 17], 2, 160
    q_pos = torch.tensor(offsets)[:, None] + torch.arange(T_)  # (B, T)
    rows = bias.at(q_pos, torch.arange(K))  # (B, H, T, K)
    assert rows.shape == (4, 4, T_, K)
    for b, offset in enumerate(offsets):
        assert torch.equal(rows[b : b + 1], bias(T_, K, offset=offset))
        torch.testing.assert_close(rows[b : b + 1], hf_attn.compute_bias(T_, K, past_seen_tokens=offset))


# ------------------------------------------------------------------------------------------ norms, MLPs
def test_rms_norm_matches_llama_and_t5_norms():
    x = randn(2, 3, 16) * 3
    ours = RMSNorm(16, eps=1e-6)
    ours.weight.data = randn(16)
    llama = hf_llama.LlamaRMSNorm(16, eps=1e-6)
    t5 = hf_t5.T5LayerNorm(16, eps=1e-6)
    llama.weight.data = t5.weight.data = ours.weight.data.clone()
    torch.testing.assert_close(ours(x), llama(x), **TOL)
    torch.testing.assert_close(ours(x), t5(x), **TOL)
    # bf16: statistic in fp32, cast back before the weight, exactly as LLaMA's norm.
    xb, ours_b, llama_b = x.bfloat16(), ours.bfloat16(), llama.bfloat16()
    assert torch.equal(ours_b(xb), llama_b(xb))


def test_layer_norm_is_the_definition():
    x = randn(4, 8)
    ln = LayerNorm(8, eps=1e-5)
    ref = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(ln(x), ref, **TOL)


def test_swiglu_matches_llama_mlp():
    config = T.LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=4)
    hf = hf_llama.LlamaMLP(config)
    ours = GatedMLP(dim=16, hidden_dim=24, act="silu")
    ours.load_state_dict(hf.state_dict())
    x = randn(2, 3, 16)
    torch.testing.assert_close(ours(x), hf(x), **TOL)


def test_geglu_matches_t5_gated_mlp():
    config = T.T5Config(d_model=16, d_ff=24, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    hf = hf_t5.T5DenseGatedActDense(config)
    ours = GatedMLP(dim=16, hidden_dim=24, act="gelu_new", names=("wi_0", "wi_1", "wo"))
    ours.load_state_dict(hf.state_dict())
    x = randn(2, 3, 16)
    torch.testing.assert_close(ours(x), hf(x), **TOL)


def test_gelu_mlp_is_the_definition():
    from transformers.activations import NewGELUActivation

    x = randn(100) * 4
    # One kernel instead of HF's written-out formula: equal to rounding, values and gradients (fp32 and float64).
    for dtype, tol in ((torch.float32, dict(atol=2e-6, rtol=1e-6)), (torch.float64, dict(atol=1e-12, rtol=1e-12))):
        a, b = (x.detach().to(dtype).requires_grad_() for _ in range(2))
        torch.testing.assert_close(gelu_tanh(a), NewGELUActivation()(b), **tol)
        gelu_tanh(a).sum().backward()
        NewGELUActivation()(b).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, **tol)
    assert (
        type(gelu_tanh(x.detach().requires_grad_()).grad_fn).__name__ == "GeluBackward0"
    )  # one kernel; only x is kept
    mlp = MLP(dim=8, hidden_dim=32, act="gelu", bias=True, names=("c_fc", "c_proj"))
    torch.testing.assert_close(mlp(x[:8]), mlp.c_proj(F.gelu(mlp.c_fc(x[:8]))))
    with pytest.raises(ValueError, match="unknown activation 'gelu2'; supported"):
        MLP(dim=8, hidden_dim=32, act="gelu2", bias=True)


def test_pre_and_post_norm_blocks_compose_as_written():
    x = randn(2, 4, 16)
    make = lambda: dict(  # noqa: E731
        attn=Attention(dim=16, n_heads=4),
        attn_norm=LayerNorm(16),
        mlp=MLP(dim=16, hidden_dim=32, act="relu", bias=True),
        mlp_norm=LayerNorm(16),
    )
    pre = PreNormBlock(**make())
    h = x + pre.attn(pre.attn_norm(x), is_causal=True)
    torch.testing.assert_close(pre(x, is_causal=True), h + pre.mlp(pre.mlp_norm(h)), **TOL)
    post = PostNormBlock(**make())
    h = post.attn_norm(x + post.attn(x))
    torch.testing.assert_close(post(x), post.mlp_norm(h + post.mlp(h)), **TOL)
