"""Token ids to text, as they come: UTF-8 never split inside a character, stop strings cut exactly."""


class TextOut:
    """Decodes a request's generated ids incrementally. ``push`` returns the text that is final: a trailing
    incomplete character (a byte-level token may carry half of one) and any tail that could still become a stop
    string are held back; a stop string ends the text just before it (it is never returned).

    Each push decodes only the tokens not yet settled, with ``context`` tokens before them (a tokenizer may spell a
    token by its neighbour, a SentencePiece leading space), not the whole answer again: O(1) per token, not O(n)."""

    context = 4

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the decoded text already returned
        self.stopped = False
        self._text, self._read = "", 0  # the text of ids[: _read], settled (it ends on a whole character)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._flush(final=False)

    def end(self) -> str:
        """What was held back, at the end of the generation."""
        return self._flush(final=True)

    def _flush(self, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._decoded()
        cut = min((i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._take(text, cut)
        end = len(text)
        if not final:
            if text.endswith("\ufffd"):
                end -= 1
            end -= max((self._partial_stop(text[self.sent : end], s) for s in self.stop), default=0)
        return self._take(text, end)

    def _decoded(self) -> str:
        """The text of all ids, decoding those after ``_read`` with ``context`` settled ones before them."""
        start = max(0, self._read - self.context)
        before = self.tokenizer.decode(self.ids[start : self._read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[start:], skip_special_tokens=True)
        if now.startswith(before):
            text = self._text + now[len(before) :]
        else:  # the new tokens respelled their context (a tokenizer's clean-up): decode it all, this once
            text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._text, self._read = text, len(self.ids)
        return text

    @staticmethod
    def _partial_stop(text: str, stop: str) -> int:
        """Length of the longest tail of ``text`` that begins ``stop`` (it may yet become the stop string)."""
        return next((n for n in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:n])), 0)

    def _take(self, text: str, end: int) -> str:
        out = text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return out
