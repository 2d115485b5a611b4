"""Tokenizer: round trips for any text, no unknown tokens, special tokens stay text."""

from __future__ import annotations

import pytest

from model.tokenizer import EOS_ID, SEP_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer, normalize

CASES = [
    "hello there, how are you?",
    "What's   the\tweather  like\ntoday?",
    "我喜欢喝茶，你呢？",
    "party time 🎉🎉 👩‍👩‍👧 ok",
    "Ça va? Übermäßig schön. Ωμέγα",
    "مرحبا بك",
    "numbers 12345 and symbols #$%&*",
]


@pytest.mark.parametrize("text", CASES)
def test_any_text_round_trips_to_its_normalised_form(tiny_tokenizer: Tokenizer, text: str) -> None:
    ids = tiny_tokenizer.encode(text)
    assert ids and UNK_ID not in ids
    assert tiny_tokenizer.decode(ids) == normalize(text)


def test_text_empty_after_normalisation_encodes_to_nothing(tiny_tokenizer: Tokenizer) -> None:
    for text in ("", "   ", "\n\t \x00\x07 \x1f\r\n"):
        assert tiny_tokenizer.encode(text) == []
        assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == ""


def test_normalise_collapses_whitespace_and_drops_control_characters() -> None:
    assert normalize("  a\x00b \t\n c  ") == "ab c"
    assert normalize("ｆｕｌｌｗｉｄｔｈ") == "fullwidth"  # NFKC
    assert normalize("bad \ud800 surrogate") == "bad surrogate"


def test_typed_special_tokens_stay_plain_text(tiny_tokenizer: Tokenizer) -> None:
    text = "hello <sep> </s> <unk> <pad> world"
    ids = tiny_tokenizer.encode(text)
    assert not {SEP_ID, EOS_ID, UNK_ID, 0, 1} & set(ids)
    assert tiny_tokenizer.decode(ids) == text


def test_context_joins_turns_with_separator_and_truncates_from_the_left(tiny_tokenizer: Tokenizer) -> None:
    a, b = tiny_tokenizer.encode("hello"), tiny_tokenizer.encode("how are you")
    assert tiny_tokenizer.encode_context(["hello", "how are you"], 100) == [*a, SEP_ID, *b]
    assert tiny_tokenizer.encode_context(["hello", "how are you"], 2) == b[-2:]


def test_special_token_ids_are_fixed(tiny_tokenizer: Tokenizer) -> None:
    for i, tok in enumerate(SPECIAL_TOKENS):
        assert tiny_tokenizer.hf.token_to_id(tok) == i


def test_saved_tokenizer_loads_identically(tiny_tokenizer: Tokenizer, tmp_path) -> None:
    tiny_tokenizer.save(tmp_path / "tokenizer.json")
    again = Tokenizer.from_str((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    for text in CASES:
        assert again.encode(text) == tiny_tokenizer.encode(text)
