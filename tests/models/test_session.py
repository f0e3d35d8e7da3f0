"""Session: a KV cache kept between turns gives the answers of the whole conversation run from scratch."""

import pytest
import torch
from conftest import padded_batch

from finetune.generation import Session, generate
from finetune.models import from_hf

MODELS = ["llama-gqa", "gpt2"]  # tiny HF models of conftest, unit-scale weights: answers depend on the context


@pytest.fixture
def model(hf_folder, request):
    return from_hf(hf_folder(request.param)[1])


def ids(T: int, seed: int) -> list[int]:
    return padded_batch(B=1, T=T, seed=seed)[0][0].tolist()


def greedy(model, conversation: list[int], n: int, **kw) -> list[int]:
    """What plain ``generate`` answers after the whole conversation, run from scratch."""
    out = generate(model, torch.tensor([conversation]), max_new_tokens=n, eos_token_id=[], **kw)
    return out[0, len(conversation) :].tolist()


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_two_turns_equal_the_whole_conversation_from_scratch(model):
    turn1, turn2 = ids(7, seed=1), ids(5, seed=2)
    s = Session(model)
    answer1 = s.generate(turn1, max_new_tokens=8)
    assert answer1 == greedy(model, turn1, 8)
    answer2 = s.generate(torch.tensor(turn2), max_new_tokens=9)  # a 1-D tensor works too
    assert answer2 == greedy(model, turn1 + answer1 + turn2, 9)
    assert len(s) == 7 + 8 + 5 + 9
    assert s.cache[0].size == len(s) - 1  # the last answer token waits for the next call


@pytest.mark.parametrize("model", MODELS, indirect=True)
def test_second_answer_depends_on_the_first_turn(model):
    turn2 = ids(5, seed=2)
    answers = []
    for first in (ids(7, seed=1), ids(7, seed=3)):
        s = Session(model)
        s.generate(first, max_new_tokens=6)
        answers.append(s.generate(turn2, max_new_tokens=6))
    assert answers[0] != answers[1]


@pytest.mark.parametrize("model", ["llama-gqa"], indirect=True)
def test_stop_ids_end_a_turn_and_the_next_turn_follows_it(model):
    turn1, turn2 = ids(7, seed=1), ids(5, seed=2)
    free = greedy(model, turn1, 12)
    stop = next(t for i, t in enumerate(free) if i >= 3 and t not in free[:i])  # first new token at step >= 3
    s = Session(model)
    streamed = []
    answer1 = s.generate(turn1, max_new_tokens=12, stop_ids=[stop], streamer=streamed.append)
    assert answer1 == free[: free.index(stop) + 1] == streamed  # the stop token is part of the answer
    assert s.generate(turn2, max_new_tokens=5) == greedy(model, turn1 + answer1 + turn2, 5)


@pytest.mark.parametrize("model", ["llama-gqa"], indirect=True)
def test_overflow_is_refused_and_leaves_the_session_usable(model):
    turn1, turn2 = ids(7, seed=1), ids(5, seed=2)
    s = Session(model, max_len=30)
    answer1 = s.generate(turn1, max_new_tokens=8)  # 15 tokens
    with pytest.raises(ValueError, match="conversation is 15 tokens, with 5 new and max_new_tokens 11 it would be 31, "
                                         "over the session's max_len of 30"):  # fmt: skip
        s.generate(turn2, max_new_tokens=11)
    assert len(s) == 15
    assert s.generate(turn2, max_new_tokens=10) == greedy(model, turn1 + answer1 + turn2, 10)  # exactly full
    assert len(s) == 30


@pytest.mark.parametrize("model", ["llama-gqa"], indirect=True)
def test_a_call_failing_midway_is_rolled_back(model):
    turn1, turn2 = ids(7, seed=1), ids(5, seed=2)
    s = Session(model)
    answer1 = s.generate(turn1, max_new_tokens=6)

    def broken(tok):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        s.generate(turn2, max_new_tokens=6, streamer=broken)  # fails after the turn went into the cache
    assert len(s) == 13
    assert s.generate(turn2, max_new_tokens=6) == greedy(model, turn1 + answer1 + turn2, 6)


@pytest.mark.parametrize("model", ["llama-gqa"], indirect=True)
def test_reset_and_seeded_sampling(model):
    turn1 = ids(7, seed=1)
    s = Session(model)
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=20)
    a = s.generate(turn1, generator=torch.Generator().manual_seed(3), **kw)
    s.reset()
    assert len(s) == 0
    b = s.generate(turn1, generator=torch.Generator().manual_seed(3), **kw)
    s.reset()
    c = s.generate(turn1, generator=torch.Generator().manual_seed(4), **kw)
    assert a == b != c


def test_bad_input_is_refused(hf_folder):
    model = from_hf(hf_folder("gpt2")[1])
    with pytest.raises(ValueError, match=r"max_len 65 is over the model's context of 64 \(n_positions\)"):
        Session(model, max_len=65)
    s = Session(model)
    assert s.max_len == 64
    with pytest.raises(ValueError, match="the session is empty"):
        s.generate([])
    with pytest.raises(ValueError, match=r"a list of ids or a 1-D tensor, got shape \(1, 3\)"):
        s.generate(torch.tensor([[4, 5, 6]]))
    with pytest.raises(ValueError, match="encoder-decoder"):
        Session(from_hf(hf_folder("t5-v1_1")[1]))
