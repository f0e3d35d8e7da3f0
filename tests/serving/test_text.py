"""``TextOut``: streamed text never splits a UTF-8 character, cuts stop strings exactly (also across tokens), and
what it holds back comes out at the end."""

from finetune.serving.text import TextOut


class Bytes:
    """A tokenizer whose tokens are single bytes, so a character may arrive in pieces."""

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def feed(text: str, stop: list[str]) -> tuple[list[str], str, bool]:
    out = TextOut(Bytes(), stop)
    parts = [out.push(b) for b in text.encode()]
    return parts, out.end(), out.stopped


def test_characters_are_never_split():
    parts, rest, _ = feed("héllo wörld €", [])
    assert "".join(parts) + rest == "héllo wörld €" and all("\ufffd" not in p for p in parts)
    assert parts[1] == "" and parts[2] == "é"  # the first byte of é waits for the second


def test_stop_string_across_tokens_is_cut_and_never_returned():
    parts, rest, stopped = feed("one END two", ["END"])
    assert "".join(parts) + rest == "one " and stopped
    parts, rest, stopped = feed("one EN", ["END"])  # a stop string's beginning is held back, then released
    assert "".join(parts) == "one " and rest == "EN" and not stopped


def test_each_push_decodes_a_bounded_window_and_the_text_equals_decoding_it_all(tmp_path):
    """With a real byte-level BPE tokenizer and random ids (characters split across tokens among them): the pieces
    add up to ``decode(all ids)``, and no push decodes more than a few tokens, however long the answer."""
    import random

    from finetune import inference
    from tests.test_inference import tiny_llama

    tok = inference.load(tiny_llama(tmp_path / "m")).tokenizer
    sizes = []

    class Counting:
        def decode(self, ids, skip_special_tokens=True):
            sizes.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    rng = random.Random(0)
    for _ in range(5):
        ids = [rng.randrange(2, len(tok)) for _ in range(300)]
        out = TextOut(Counting(), [])
        text = "".join(out.push(i) for i in ids) + out.end()
        assert text == tok.decode(ids, skip_special_tokens=True)
    assert max(sizes) <= 2 * TextOut.context + 8, max(sizes)
