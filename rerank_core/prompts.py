"""Prompt templates of both rerankers, to the character.

Text pair (both models): ``question:{query} \\n \\n passage:{passage}`` - no space after either colon,
and space-newline-space-newline-space before ``passage:``. The VL model puts the image block first:
``<img><IMG_CONTEXT>x(256*tiles)</img> question:{query} \\n \\n passage:{text}``.
"""

from __future__ import annotations

QUESTION_PREFIX = "question:"
PASSAGE_PREFIX = " \n \n passage:"

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"


def text_prompt(query: str, passage: str) -> str:
    """The one-sequence prompt of a (query, passage) pair."""
    return QUESTION_PREFIX + query + PASSAGE_PREFIX + passage


def image_prompt_suffix(query: str, passage: str) -> str:
    """What follows the image block in an image or image+text document (note the leading space)."""
    return " " + text_prompt(query, passage)


def image_block(num_tiles: int, tokens_per_tile: int = 256) -> str:
    """The image block as text (for display and tests; the tokenizer builds the ids directly)."""
    return IMG_START + IMG_CONTEXT * (num_tiles * tokens_per_tile) + IMG_END
