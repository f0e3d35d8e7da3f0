"""The CPU dropout's mask has nn.Dropout's distribution: Bernoulli(1 - p) per element scaled by 1/(1 - p), mean 1,
variance p/(1 - p), independent across elements (neighbours, the two halves of one 64-bit draw, two calls); and
LoRA's dropouts are swapped for it, keeping p and everything else that is trained."""

import math

import pytest
import torch
from torch import nn

from finetune.nn.dropout import Dropout, keep_mask
from finetune.tasks import CausalLM

N = 1 << 21


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mask_is_bernoulli_and_scaled_like_nn_dropout(p, dtype):
    torch.manual_seed(0)
    x = torch.randn(N, dtype=dtype)
    y = Dropout(p)(x)
    kept = y != 0
    keep = 1 - p
    sigma = math.sqrt(p * keep / N)
    assert abs(kept.float().mean().item() - keep) < 5 * sigma
    ref = x * (1 / keep)  # nn.Dropout's kept values, in the input's dtype
    assert torch.equal(y[kept], ref[kept]) and y.dtype == dtype
    ones = Dropout(p)(torch.ones(N))
    assert abs(ones.mean().item() - 1) < 5 * math.sqrt(p / keep / N)
    assert abs(ones.var().item() - p / keep) < 0.02 * p / keep


def test_mask_elements_are_independent():
    p = 0.1
    torch.manual_seed(1)
    m = (~keep_mask(torch.Size([N]), 1 - p)).float()  # dropped = 1
    m2 = (~keep_mask(torch.Size([N]), 1 - p)).float()
    sigma = math.sqrt(p * p * (1 - p * p) / N)  # of an estimate of P(both dropped) = p^2
    for a, b in [(m[0::2], m[1::2]), (m[:-1], m[1:]), (m[:-7], m[7:]), (m, m2)]:  # same 64-bit draw, neighbours,
        assert abs((a * b).mean().item() - p * p) < 5 * sigma  # a farther lag, two calls


def test_gradient_is_the_mask_scaled_and_eval_and_edge_cases_are_nn_dropout():
    torch.manual_seed(2)
    x = torch.randn(4, 33, 17, requires_grad=True)
    d = Dropout(0.2)
    y = d(x)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * (y != 0) / 0.8)
    d.eval()
    assert torch.equal(d(x), x)
    torch.manual_seed(3)
    a = Dropout(0.3).train()(x)
    torch.manual_seed(3)
    assert torch.equal(Dropout(0.3).train()(x), a)  # reproducible from torch's seed
    assert not Dropout(1.0)(x).any() and torch.equal(Dropout(0.0)(x), x)


def test_lora_dropouts_are_swapped_keeping_p(stand_in):
    task = CausalLM(pretrained=str(stand_in("llama")), adapter={"preset": "lora-all-linear", "lora_dropout": 0.1})
    task.configure_model()
    drops = [m for n, m in task.model.named_modules() if ".lora_dropout." in n]
    assert drops and all(type(d) is Dropout and d.p == 0.1 for d in drops)
    assert all(type(m) is not nn.Dropout for n, m in task.model.named_modules() if "lora_dropout" in n)
    # and what trains is unchanged: only adapter weights, and no state for the dropouts
    assert all("lora_" in n for n, p in task.model.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", ["bert", "t5", "gpt2"])
def test_from_scratch_models_drop_out_with_it(stand_in, arch):
    """Our models' own dropouts (embeddings, residuals, MLP hidden, BERT's classifier) are the cheaper one too."""
    from finetune.models.hub import from_hf

    model = from_hf(stand_in(arch))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout for m in drops)
