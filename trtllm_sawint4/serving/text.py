"""Streaming text of one request: incremental detokenization and stop strings.

Detokenization follows the prefix/read-offset scheme of vLLM and TGI: each new token's text is the
difference between decoding a short window of recent tokens with and without it, so a token that
completes a multi-byte character (or drops a SentencePiece leading space) is rendered right, and a
window ending in an incomplete character ("\\ufffd") waits for the next token. Text that could still
grow into a stop string is held back; a found stop string ends the text just before it.
"""

from __future__ import annotations


class RequestText:
    """Incremental text of one request's generated tokens."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])  # a little prompt context: the first token renders as it would inline
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.text = ""  # all text decoded so far (up to a found stop string)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one generated token; returns the text that may be streamed now ("" if none)."""
        if self.tokenizer is None or self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The request ends: whatever is still held back (an incomplete character, a possible stop prefix)."""
        if self.tokenizer is None or self.stopped:
            return ""
        if self.read_offset < len(self.ids):
            prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
            full = self._decode(self.ids[self.prefix_offset:])
            self.text += full[len(prefix):]
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop:
            longest = max(len(s) for s in self.stop)
            start = max(0, self.emitted - longest + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                return self._take(len(self.text))
            if not final:
                return self._take(len(self.text) - self._held_back())
        return self._take(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest end of the text that is the start of a stop string."""
        tail = self.text[-max(len(s) for s in self.stop):]
        for n in range(len(tail), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _take(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted:upto]
        self.emitted = upto
        return out
