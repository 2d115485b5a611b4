"""Corpora: loaders, disjoint splits, pairs, and clear errors for malformed files."""

from __future__ import annotations

import pytest

from model.config import ModelConfig
from model.corpus import CorpusError, load_corpora, load_spec, make_pairs, split_conversations
from model.data import encode_pairs
from tests.conftest import toy_conversations, write_jsonl, write_tsv


def test_splits_are_disjoint_by_conversation_and_fixed_by_seed() -> None:
    convs = [[f"c{i} turn {j}" for j in range(3)] for i in range(200)]
    a = split_conversations(convs, seed=3)
    b = split_conversations(convs, seed=3)
    assert a == b
    ids = [{c[0] for c in part} for part in (a.train, a.valid, a.test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert sum(len(s) for s in ids) == 200 and ids[1] and ids[2]
    assert split_conversations(convs, seed=4).test != a.test


def test_pairs_use_the_last_k_turns_as_context() -> None:
    pairs = make_pairs([["a", "b", "c", "d"]], context_turns=2)
    assert [(p.context, p.response) for p in pairs] == [
        (("a",), "b"), (("a", "b"), "c"), (("b", "c"), "d")]


def test_chitchat_keeps_at_least_95_percent_of_pairs(tiny_tokenizer) -> None:
    convs = load_spec("chitchat")
    pairs = make_pairs(convs, context_turns=2)
    print(f"chitchat: {len(convs)} conversations, {len(pairs)} pairs")
    assert len(convs) > 3500 and len(pairs) > 100_000
    cfg = ModelConfig(vocab_size=tiny_tokenizer.vocab_size, max_source_len=64, max_target_len=40)
    sample = pairs[::50]
    kept = encode_pairs(sample, tiny_tokenizer, cfg)
    assert len(kept) / len(sample) >= 0.95
    assert all(len(src) <= 64 and len(tgt) <= 40 for src, tgt in kept)


def test_chitchat_merges_consecutive_messages_of_one_speaker() -> None:
    convs = load_spec("chitchat")
    # conversation a07edb12 opens with two messages by one person, then the other answers
    opening = [c for c in convs if c[0] == "Hello How are you doing today?"]
    assert any(c[1].startswith("whats up MD im doing good how are you doing?") for c in opening)


def test_chatterbot_languages_load_including_chinese() -> None:
    english = load_spec("chatterbot:english")
    chinese = load_spec("chatterbot:chinese")
    assert len(english) > 100 and len(chinese) > 50
    assert any("\u4e00" <= ch <= "\u9fff" for c in chinese[:20] for t in c for ch in t)
    with pytest.raises(CorpusError, match="unknown chatterbot language"):
        load_spec("chatterbot:klingon")


def test_tsv_and_jsonl_files_load(tmp_path) -> None:
    tsv = write_tsv(tmp_path / "a.tsv", [("hi", "hello"), ("how are you", "fine")])
    jsonl = write_jsonl(tmp_path / "b.jsonl", toy_conversations(5))
    convs = load_corpora(f"{tsv},{jsonl}")
    assert convs[:2] == [["hi", "hello"], ["how are you", "fine"]]
    assert len(convs) == 7


def test_malformed_tsv_line_is_reported_with_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.tsv"
    path.write_text("hi\thello\nno tab here\n", encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.tsv:2"):
        load_spec(str(path))


def test_malformed_jsonl_lines_are_reported_with_file_and_line(tmp_path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"turns": ["a", "b"]}\n{"turns": "oops"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2"):
        load_spec(str(path))
    path.write_text('{"turns": ["a", "b"]}\n\n{not json\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl:3: invalid JSON"):
        load_spec(str(path))


def test_unknown_spec_and_missing_file_are_clear_errors(tmp_path) -> None:
    with pytest.raises(CorpusError, match="unknown corpus"):
        load_spec("reddit")
    with pytest.raises(CorpusError, match="no such corpus file"):
        load_spec(str(tmp_path / "missing.tsv"))
