"""Small corpora split sensibly; too small ones are refused; CJK text counts words per character."""

from __future__ import annotations

import pytest

from model.config import RunConfig, TokenizerConfig
from model.corpus import load_corpora
from model.evaluation import word_count
from model.training import TrainingError, prepare_corpus
from tests.conftest import write_tsv


def test_a_file_of_200_pairs_splits_180_10_10(tmp_path) -> None:
    pairs = [(f"question number {i}", f"answer number {i}") for i in range(200)]
    corpus = prepare_corpus(str(write_tsv(tmp_path / "mine.tsv", pairs)),
                            RunConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1)))
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (180, 10, 10)


def test_a_tiny_file_still_gets_a_validation_pair(tmp_path) -> None:
    pairs = [(f"q {i}", f"a {i}") for i in range(12)]
    corpus = prepare_corpus(str(write_tsv(tmp_path / "mine.tsv", pairs)),
                            RunConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1)))
    assert len(corpus.valid) >= 1 and len(corpus.train) >= 8


def test_a_corpus_too_small_to_train_on_says_so(tmp_path) -> None:
    path = write_tsv(tmp_path / "mine.tsv", [("hi", "hello"), ("bye", "see you"), ("ok", "fine")])
    with pytest.raises(TrainingError, match=r"training pairs .* at least 8 are needed"):
        prepare_corpus(str(path), RunConfig(tokenizer=TokenizerConfig(vocab_size=300, min_frequency=1)))


def test_han_kana_and_hangul_count_one_word_each() -> None:
    assert word_count("hello world") == 2
    assert word_count("你好世界") == 4
    assert word_count("我喜欢 music 和 films!") == 6
    assert word_count("こんにちは") == 5 and word_count("안녕하세요 friend") == 6


def test_chinese_word_perplexity_counts_characters() -> None:
    turns = [t for conv in load_corpora("chatterbot:chinese") for t in conv]
    han = sum(1 for t in turns for ch in t if "\u4e00" <= ch <= "\u9fff")
    assert han > 1000  # the corpus is Chinese
    counted = sum(word_count(t) for t in turns)
    assert counted >= han  # every character a word ...
    assert counted > 3 * sum(len(t.split()) for t in turns)  # ... where whitespace sees a few
