"""Turning generated token ids into streamed text, with stop strings.

Text is decoded from all generated ids each time (cheap at these lengths, and exact where a
token only makes sense with its neighbours); an incomplete UTF-8 sequence at the end ("\\ufffd")
and a tail that could still grow into a stop string are held back until they resolve.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class IncrementalText:
    tokenizer: Any  # a transformers tokenizer, or None for token-id-only use
    stop: tuple[str, ...] = ()
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters already streamed

    def add(self, token_id: int) -> tuple[str, bool]:
        """Append a token; return (new text to stream, whether a stop string ended the text)."""
        self.ids.append(token_id)
        if self.tokenizer is None:
            return "", False
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s, max(0, self.emitted - len(s) + 1))
            if at != -1:
                delta = text[self.emitted : at]
                self.emitted = max(self.emitted, at)
                return delta, True
        safe = len(text)
        if text.endswith("\ufffd"):
            safe -= 1
        for s in self.stop:  # hold back a suffix that is a prefix of a stop string
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[safe - k : safe] == s[:k]:
                    safe -= k
                    break
        delta = text[self.emitted : max(safe, self.emitted)]
        self.emitted += len(delta)
        return delta, False

    def flush(self) -> str:
        """The held-back text, when the request ends for another reason than a stop string."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        delta = text[self.emitted :]
        self.emitted = len(text)
        return delta
