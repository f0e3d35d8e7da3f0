"""Random init of models trained from scratch: the same distributions as transformers' init."""

import math

import pytest
import torch
import transformers

from finetune.models import from_config

GPT2 = dict(model_type="gpt2", vocab_size=512, n_embd=256, n_layer=4, n_head=4, n_positions=64)
LLAMA = dict(
    model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=4, max_position_embeddings=64,
)  # fmt: skip


def stds(model, names: dict[str, str]) -> dict[str, float]:
    """Weight std per kind (key: a suffix of the parameter name) over all layers."""
    state = model.state_dict()
    return {kind: torch.cat([v.flatten() for k, v in state.items() if k.endswith(s)]).std().item()
            for kind, s in names.items()}  # fmt: skip


@pytest.mark.parametrize(
    "config, hf_cls, ours, theirs, expected",
    [
        # GPT-2 scales the two projections into the residual stream by 1/sqrt(2 * n_layer)
        (GPT2, transformers.GPT2LMHeadModel, {"residual": "c_proj.weight", "in": "c_fc.weight"},
         {"residual": "c_proj.weight", "in": "c_fc.weight"}, {"residual": 0.02 / math.sqrt(8), "in": 0.02}),
        (LLAMA, transformers.LlamaForCausalLM, {"residual": "o_proj.weight", "in": "up_proj.weight"},
         {"residual": "o_proj.weight", "in": "up_proj.weight"}, {"residual": 0.02, "in": 0.02}),
    ],
    ids=["gpt2", "llama"],
)  # fmt: skip
def test_init_matches_transformers(config, hf_cls, ours, theirs, expected):
    torch.manual_seed(0)
    model = from_config(config)
    hf_config = transformers.AutoConfig.for_model(**config)
    reference = hf_cls(hf_config)
    got, ref = stds(model, ours), stds(reference, theirs)
    for kind, value in expected.items():
        assert got[kind] == pytest.approx(value, rel=0.03), kind
        assert ref[kind] == pytest.approx(value, rel=0.03), kind  # the reference agrees: the expectation is HF's
