"""Turning generated token ids into streamed text, with stop strings, in time linear in the output.

Text comes from the ``tokenizers`` library's ``DecodeStream``, which decodes one token at a time
and holds back a token that does not yet complete a UTF-8 character; re-decoding every generated
id per token (what this did before) is quadratic in the output's length.

Stop strings are matched with one Knuth-Morris-Pratt automaton each, fed every new character once:
its state is the longest prefix of the stop string that the text ends with, so a match is found as
it completes and exactly that many characters are held back (they may turn out to start a stop
string). Work per character is amortised constant per stop string, whatever their lengths; the
request schema caps how long a stop string may be (``MAX_STOP_CHARS``).

vLLM's two text options: ``skip_special_tokens`` (default on) leaves special tokens out of the
text, and ``include_stop_str_in_output`` ends the text with the stop string that matched instead
of just before it (what follows it in the same token is dropped either way).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokenizers.decoders import DecodeStream


class StopMatcher:
    """KMP over one pattern: ``feed`` a character, learn whether the pattern just ended there."""

    def __init__(self, pattern: str) -> None:
        self.pattern = pattern
        self.state = 0  # length of the longest prefix of ``pattern`` the text fed so far ends with
        fail = [0] * len(pattern)  # fail[i]: longest proper border of pattern[:i + 1]
        k = 0
        for i in range(1, len(pattern)):
            while k and pattern[i] != pattern[k]:
                k = fail[k - 1]
            if pattern[i] == pattern[k]:
                k += 1
            fail[i] = k
        self._fail = fail

    def feed(self, ch: str) -> bool:
        k = self.state
        while k and ch != self.pattern[k]:
            k = self._fail[k - 1]
        if ch == self.pattern[k]:
            k += 1
        if k == len(self.pattern):
            self.state = self._fail[k - 1]
            return True
        self.state = k
        return False


@dataclass
class IncrementalText:
    tokenizer: Any  # a transformers tokenizer, or None for token-id-only use
    stop: tuple[str, ...] = ()
    skip_special_tokens: bool = True
    include_stop: bool = False  # vLLM's include_stop_str_in_output
    _held: str = ""  # decoded, not yet streamed: it could still be the start of a stop string
    _matchers: list[StopMatcher] = field(default_factory=list)
    _stream: DecodeStream | None = None

    def __post_init__(self) -> None:
        self._matchers = [StopMatcher(s) for s in self.stop]
        if self.tokenizer is not None:
            self._stream = DecodeStream(skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new text to stream, whether a stop string ended the text)."""
        if self._stream is None:
            return "", False
        piece = self._stream.step(self.tokenizer.backend_tokenizer, token_id)
        if not piece:
            return "", False
        base = len(self._held)
        self._held += piece
        for i, ch in enumerate(piece):
            for m in self._matchers:
                if m.feed(ch):
                    text = self._held[: base + i + 1 - (0 if self.include_stop else len(m.pattern))]
                    self._held = ""
                    return text, True
        keep = max((m.state for m in self._matchers), default=0)
        cut = len(self._held) - keep
        text, self._held = self._held[:cut], self._held[cut:]
        return text, False

    def flush(self) -> str:
        """The held-back text, when the request ends for another reason than a stop string."""
        text, self._held = self._held, ""
        return text
