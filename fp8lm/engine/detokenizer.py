"""A sequence's output text grown token by token: each new token costs the decoding of a short
window, not of the whole output (which made every step O(output length))."""
from __future__ import annotations

from fp8lm.model.tokenizer import Tokenizer

INCOMPLETE = "\ufffd"      # what a decoder writes for the first bytes of a character still to come


class IncrementalDetokenizer:
    """The window runs from the first token of the previous update that added text to the end. Its
    text minus the text of the same window without the new tokens is what they add: both decodes
    start at the same token, so a tokenizer that strips a leading space or joins pieces across
    tokens treats them alike. Text ending in an incomplete UTF-8 character waits for its next
    bytes, unless the output is finished (then it is written as the decoder writes it)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool, first: int = 0):
        """`first`: where the output starts in the token ids `update` gets (the prompt's length)."""
        self.tokenizer, self.skip_special_tokens = tokenizer, skip_special_tokens
        self.prefix_offset = first      # the window's first token
        self.read_offset = first        # the tokens before this one have had their text returned

    def update(self, token_ids: list[int], finished: bool = False) -> str:
        """`token_ids`: the sequence so far. Returns the text the tokens since the last call add."""
        if len(token_ids) <= self.read_offset:
            return ""
        window = self.tokenizer.decode(token_ids[self.prefix_offset:], self.skip_special_tokens)
        if window.endswith(INCOMPLETE) and not finished:
            return ""
        known = self.tokenizer.decode(token_ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        new = window[len(known):]
        if new:     # else the window keeps its start: one that decodes to nothing would lose a leading space
            self.prefix_offset = self.read_offset
        self.read_offset = len(token_ids)
        return new
