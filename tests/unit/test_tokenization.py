"""Prompts, BOS/EOS, special-token strings and truncation modes."""

from __future__ import annotations

import pytest

from rerank_core import InputTooLong, InvalidInput
from rerank_core.prompts import text_prompt
from rerank_core.tokenization import PromptTokenizer


@pytest.fixture(scope="module")
def tok(llama3_tokenizer_dir):
    return PromptTokenizer(llama3_tokenizer_dir, max_length=8192)


def test_template_to_the_character():
    assert text_prompt("Q", "P") == "question:Q \n \n passage:P"
    assert text_prompt("", "") == "question: \n \n passage:"


def test_bos_only_no_eos(tok):
    enc = tok.encode_text_pairs("q", ["p"])
    ids = enc.pair(0).tolist()
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert 128001 not in ids and 128009 not in ids
    assert ids[1:] == tok.plain.encode("question:q \n \n passage:p", add_special_tokens=False).ids


def test_hello_world_matches_published_ids(tok):
    assert tok.plain.encode("Hello world!", add_special_tokens=False).ids == [9906, 1917, 0]


@pytest.mark.parametrize("special", ["<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>"])
def test_special_token_strings_stay_plain_text(tok, special):
    enc = tok.encode_text_pairs(f"a {special} b", [f"x{special}y"])
    ids = enc.pair(0).tolist()
    assert ids[0] == 128000
    assert all(i < 128000 for i in ids[1:]), "a control token leaked out of user text"
    assert tok.plain.decode(ids[1:]) == f"question:a {special} b \n \n passage:x{special}y"


def test_truncate_end_cuts_passage_tail(tok):
    doc = "word " * 500
    enc = tok.encode_text_pairs("short query", [doc, "tiny"], max_length=64)
    assert enc.lengths.tolist()[0] == 64
    assert enc.truncated == [0]
    assert any("document 0 truncated to 64" in w for w in enc.warnings())
    full = tok.encode_text_pairs("short query", [doc]).pair(0).tolist()
    assert enc.pair(0).tolist() == full[:64]
    assert enc.lengths[1] < 64


def test_truncate_none_errors_with_lengths(tok):
    with pytest.raises(InputTooLong) as e:
        tok.encode_text_pairs("q", ["word " * 200], truncate="NONE", max_length=64)
    assert "Input length 2" in e.value.message and "exceeds maximum allowed token size 64" in e.value.message


def test_truncate_none_accepts_fitting_pairs(tok):
    enc = tok.encode_text_pairs("q", ["short"], truncate="NONE", max_length=64)
    assert enc.truncated == [] and enc.warnings() == []


def test_query_budget_keeps_room_for_the_passage(tok):
    long_query = "why " * 200
    enc = tok.encode_text_pairs(long_query, ["the passage text"], max_length=128)
    ids = enc.pair(0).tolist()
    assert len(ids) <= 128
    assert enc.query_truncated and any("query truncated to 64" in w for w in enc.warnings())
    text = tok.plain.decode(ids[1:])
    assert text.endswith("passage:the passage text")


def test_query_budget_is_configurable(llama3_tokenizer_dir):
    t = PromptTokenizer(llama3_tokenizer_dir, max_length=128, query_budget=10)
    enc = t.encode_text_pairs("why " * 50, ["p"])
    assert enc.query_truncated
    with pytest.raises(InputTooLong):
        t.encode_text_pairs("why " * 50, ["p"], truncate="NONE")


def test_max_tokens_per_doc(tok):
    enc = tok.encode_text_pairs("q", ["one two three four five six seven", "one"], max_tokens_per_doc=3)
    assert tok.plain.decode(enc.pair(0).tolist()[1:]) == "question:q \n \n passage:one two three"
    assert enc.truncated == [0]
    assert tok.plain.decode(enc.pair(1).tolist()[1:]) == "question:q \n \n passage:one"


def test_chunk_strategy_covers_the_passage(tok):
    words = [f"w{i}" for i in range(300)]
    doc = " ".join(words)
    enc = tok.encode_text_pairs("q", ["short doc", doc], truncate="CHUNK", max_length=64)
    assert enc.num_docs == 2
    assert enc.doc_index.tolist().count(0) == 1
    n_chunks = enc.doc_index.tolist().count(1)
    assert n_chunks > 3
    assert max(enc.lengths) <= 64
    seen = " ".join(tok.plain.decode(enc.pair(i).tolist()[1:]) for i in range(len(enc.lengths)))
    for w in words:  # every word of the passage lands in some chunk
        assert f"{w} " in seen + " " or seen.endswith(w)
    assert any("split into" in w for w in enc.warnings())


def test_unknown_truncate_mode(tok):
    with pytest.raises(InvalidInput):
        tok.encode_text_pairs("q", ["p"], truncate="MIDDLE")


def test_truncate_is_case_insensitive(tok):
    assert tok.encode_text_pairs("q", ["p"], truncate="end").num_docs == 1


@pytest.mark.parametrize("query, docs, where", [("\ud800", ["a"], "query"), ("q", ["ok", "bad \udfff"], "document 1")])
def test_lone_surrogates_get_a_clear_error(tok, query, docs, where):
    with pytest.raises(InvalidInput, match=f"{where} is not valid Unicode text"):
        tok.encode_text_pairs(query, docs)
    assert tok.encode_text_pairs("q é ✓", ["ok ü 😀"]).lengths.tolist()  # real non-ASCII text passes
