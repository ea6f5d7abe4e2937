"""The world's tokenizer corpus: a sentencepiece model trained on it covers the grammar and every subject name."""

from __future__ import annotations

import sentencepiece

from phantom_core.tiny.text import train_tiny_tokenizer
from phantom_core.world.corpus import world_corpus
from phantom_core.world.grammar import GRAMMAR_WORDS
from phantom_core.world.subjects import subject_pool
from tests.support.world import SMALL, small_sample


def test_a_world_tokenizer_needs_no_byte_fallback():
    pool = subject_pool(SMALL.sources)
    corpus = world_corpus(pool)
    assert corpus == world_corpus(pool) and len(corpus) == 2 * len(pool)
    tokenizer = sentencepiece.SentencePieceProcessor(model_proto=train_tiny_tokenizer(corpus, vocab_size=320))  # the no-font pool supports at most ~340 pieces
    texts = [s.name for s in pool] + list(GRAMMAR_WORDS) + [small_sample(i).prompt for i in range(6)]
    for text in texts:
        pieces = tokenizer.encode(text, out_type=str)
        assert not any(p.startswith("<0x") for p in pieces), (text, pieces)
        assert tokenizer.decode(tokenizer.encode(text)) == text
