"""The model folder's tokenizer and chat template (transformers' fast tokenizer underneath)."""
from __future__ import annotations

import functools
import re
from pathlib import Path

from fp8lm.errors import FP8LMError


# Stand-ins for message contents while a chat template renders (private-use characters no template
# touches), so that what the client wrote is tokenized apart from what the template adds.
_CONTENT = re.compile("\ue000(\\d+)\ue001")


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer

    @functools.cached_property
    def max_token_chars(self) -> int:
        """No token decodes to more characters (a vocabulary entry's length bounds its text's)."""
        return max(map(len, self.hf.get_vocab()))

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer | None:
        """None when the folder has no tokenizer files (token-id prompts still work)."""
        folder = Path(folder)
        if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
            return None
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(folder)))

    @property
    def eos_token_ids(self) -> list[int]:
        return [] if self.hf.eos_token_id is None else [self.hf.eos_token_id]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.hf.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """`tools`: OpenAI function definitions, for templates that render them."""
        if not self.hf.chat_template:
            raise FP8LMError("this model's tokenizer has no chat template; use a plain prompt")
        _check_messages(messages)
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           tools=[{"type": "function", "function": t} for t in tools] if tools else None)


    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                    special_tokens_in_content: bool = False) -> tuple[str, list[int]]:
        """The rendered conversation and its token ids. Special-token strings typed inside message
        contents (`<|im_start|>`, ...) are tokenized as the text they are, so that no message can
        forge another turn, unless `special_tokens_in_content`; the template's own are special."""
        if special_tokens_in_content:
            text = self.apply_chat_template(messages, add_generation_prompt, tools)
            return text, self.encode(text, add_special_tokens=False)
        contents, stand_ins = [], []
        for m in messages:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                contents.append(m["content"])
                m = {**m, "content": f"\ue000{len(contents) - 1}\ue001"}
            stand_ins.append(m)
        rendered = self.apply_chat_template(stand_ins, add_generation_prompt, tools)
        pieces = _CONTENT.split(rendered)      # template text, content index, template text, ...
        ids, text = [], []
        for i, piece in enumerate(pieces):
            if i % 2:
                piece = contents[int(piece)]
                ids += self.hf(piece, add_special_tokens=False, split_special_tokens=True)["input_ids"]
            elif piece:
                ids += self.encode(piece, add_special_tokens=False)
            text.append(piece)
        return "".join(text), ids


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise FP8LMError("messages: expected a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise FP8LMError(f"messages[{i}]: expected an object with 'role' and 'content'")
