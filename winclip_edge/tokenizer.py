"""open_clip's CLIP tokenizer without torch: the bundle's ``tokenizer.json`` run by HuggingFace ``tokenizers``.

The file is written at export from open_clip's own BPE vocabulary and merges (winclip_edge/export/text_encoder.py)
and carries the whole token contract: open_clip's split pattern, byte-level BPE with ``</w>`` word ends, the
start/end-of-text tokens, truncation to the context length keeping the end token, zero padding. The clean-up
before it is open_clip's ``lower`` clean-up, done here with the same calls (``ftfy.fix_text``, HTML unescape
twice, whitespace collapsed, lower case): ftfy is run itself, not imitated, because no fixed normaliser
reproduces it (curly quotes, ligatures, full-width forms, mojibake). models/README.md documents the file.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import WinclipError

TOKENIZER_JSON = "tokenizer.json"
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
INSTALL_HINT = "pip install 'winclip-edge[text]'"


class TokenizerError(WinclipError):
    """The tokenizer file cannot be used, its packages are missing, or a text cannot be tokenized faithfully."""


def clean(text: str) -> str:
    """open_clip's ``lower`` clean-up: ``ftfy.fix_text``, HTML unescape twice, whitespace collapsed, lower case."""
    try:
        import ftfy
    except ImportError:
        raise TokenizerError(f"tokenizing prompts needs the ftfy package (open_clip's text clean-up); {INSTALL_HINT}") from None
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class ClipTokenizer:
    """Token ids ``int64 [N, context_length]`` equal to open_clip's ``SimpleTokenizer`` for the same texts."""

    def __init__(self, path: str | Path, context_length: int):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"tokenizing prompts needs the tokenizers package; {INSTALL_HINT}") from None
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust loader reports every problem as a plain Exception
            raise TokenizerError(f"{path} is not a usable tokenizer file ({str(err)[:200]}); "
                                 "re-create it with `winclip-edge add-text-encoder --force`") from None
        padding, truncation = self._tokenizer.padding, self._tokenizer.truncation
        if not padding or padding.get("length") != context_length or not truncation \
                or truncation.get("max_length") != context_length:
            raise TokenizerError(f"{path} does not pad and truncate to the bundle's context length {context_length}; "
                                 "re-create it with `winclip-edge add-text-encoder --force`")
        self.context_length = context_length
        self._specials = (START_OF_TEXT, END_OF_TEXT)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        cleaned = [clean(t) for t in texts]
        for original, text in zip(texts, cleaned):
            # open_clip maps these words to its control tokens only in some contexts; refuse rather than differ
            if any(s in text for s in self._specials):
                raise TokenizerError(f"text {original!r} contains a reserved token ({' or '.join(self._specials)})")
        encodings = self._tokenizer.encode_batch(cleaned)
        return np.array([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), self.context_length)
