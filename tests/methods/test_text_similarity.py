"""TF-IDF text similarity against a brute-force twin (every training-query cosine, then the mean)."""
import numpy as np
import pytest

from trustrepair.methods.text_similarity import text_similarity


def test_mean_cosine_equals_the_brute_force_mean_and_ranks_a_copy_first():
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics.pairwise import cosine_similarity

    train = ["the cat sat on the mat", "stocks fell sharply today", "a dog chased the cat", "rain is expected",
             "Which is the largest ocean? The Atlantic."]
    queries = {"truthfulness": ["Which is the largest ocean? The Atlantic.", "What is the capital? Sydney."],
               "pets": ["my cat and my dog", "the cat purred", "dogs bark"]}
    got = text_similarity(train, queries)
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit(
        [*train, *(t for texts in queries.values() for t in texts)])
    for aspect, texts in queries.items():
        want = cosine_similarity(vectorizer.transform(train), vectorizer.transform(texts)).mean(axis=1)
        np.testing.assert_allclose(got[aspect], want, rtol=1e-12, atol=1e-15)
    assert int(np.argmax(got["truthfulness"])) == 4
    assert got["pets"][1] == 0.0


def test_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="training text"):
        text_similarity([], {"a": ["x"]})
    with pytest.raises(ValueError, match="without query texts"):
        text_similarity(["x"], {"a": []})
