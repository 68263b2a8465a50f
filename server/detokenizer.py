"""Incremental detokenization with stop strings, one `IncrementalDetokenizer` per request.

Byte-level BPE splits multi-byte UTF-8 characters across tokens; decoding a prefix then
ends in U+FFFD. We decode a short window of recent tokens and emit only text that no later
token can change (TGI's prefix/read offsets), so a half character is never emitted. Stop
strings are searched in the generated text; a suffix that could still become a stop string
is held back until decided, and a matched stop string never leaks (unless asked for).
This module knows the tokenizer and strings only; server/engine.py calls it once per token.
"""

from __future__ import annotations

from fanformer.tokenizer import Tokenizer

REPLACEMENT = "\ufffd"
# A UTF-8 character is at most 4 bytes and every token carries at least one, so text still
# ending in U+FFFD after this many held tokens is invalid bytes, not a half character.
MAX_HELD_TOKENS = 4


class IncrementalDetokenizer:
    """Feed generated token ids one at a time; get back the text that is safe to emit."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None,
                 include_stop_str_in_output: bool = False, skip_special_tokens: bool = True,
                 min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self.skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0  # decoding starts here (context for byte-level merges)
        self.read_offset = 0  # text of ids[prefix_offset:read_offset] is already in `text`
        self.text = ""  # all decided text of the generated tokens
        self.emitted = 0  # characters of `text` handed out so far
        self.stopped = False
        # min_tokens (vLLM semantics): a stop string counts only if it ends in the text of
        # the min_tokens-th token or later; until then nothing is held back for it
        self.min_tokens = min_tokens
        self.num_tokens = 0  # tokens added, hidden ones included
        self.armed_at: int | None = 0 if min_tokens == 0 else None  # text offset

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special)

    def add_token(self, token_id: int, visible: bool = True) -> str:
        """Append one token and return the newly emittable text ("" while held back).

        `visible=False` appends nothing to the text (a stop token id the caller hides).
        After a stop string matched, `self.stopped` is True and later calls return "".
        """
        if self.stopped:
            return ""
        self.num_tokens += 1
        if self.armed_at is None and self.num_tokens >= self.min_tokens:
            self.armed_at = len(self.text)
        if visible:
            self.ids.append(token_id)
            window = self._decode(self.ids[self.prefix_offset:])
            before = self._decode(self.ids[self.prefix_offset:self.read_offset])
            complete = not window.endswith(REPLACEMENT)
            if len(window) > len(before) and (
                    complete or len(self.ids) - self.read_offset >= MAX_HELD_TOKENS):
                self.text += window[len(before):]
                self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end (length/EOS): release what was held back, minus any half character."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):
            tail = self._decode(self.ids[self.prefix_offset:])
            before = self._decode(self.ids[self.prefix_offset:self.read_offset])
            self.text += tail[len(before):].rstrip(REPLACEMENT)
            self.read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stop and self.armed_at is not None:
            # a stop string can only start in the part not yet handed out
            longest = max(len(s) for s in self.stop)
            search_from = max(0, self.emitted - longest + 1)
            hits = [(i, s) for s in self.stop
                    if (i := self._find(s, search_from)) >= 0]
            if hits:
                index, stop = min(hits)
                end = index + (len(stop) if self.include_stop else 0)
                out = self.text[self.emitted:max(end, self.emitted)]
                self.text = self.text[:max(end, self.emitted)]
                self.emitted = len(self.text)
                self.stopped = True
                return out
        hold = 0 if final or self.armed_at is None else self._held_back()
        end = len(self.text) - hold
        out = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return out

    def _find(self, stop: str, start: int) -> int:
        """The first occurrence of `stop` from `start` that ends after `armed_at`, or -1."""
        return self.text.find(stop, max(start, self.armed_at - len(stop) + 1))

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text) - self.emitted), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold
