"""Text-similarity attribution: the ranking a practitioner without gradients would try (issue 17's text
baseline), by TF-IDF (scikit-learn's :class:`~sklearn.feature_extraction.text.TfidfVectorizer`).

Each training example z is the text ``prompt + response``; each query pair q of an aspect is the text of
its prompt and its untrustworthy (opponent) answer, the behaviour the culprits would have taught. With
v(.) the L2-normalised TF-IDF vector (word unigrams and bigrams, sublinear term frequency, the vocabulary
and document frequencies fitted on the training texts and the queries together):

    text^j(z) = mean_{q in Q_j} <v(z), v(q)>      (mean cosine similarity to the aspect's queries)

Higher = more similar = ranked as more detrimental, the library's convention. Sparse products in float64.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np


def text_similarity(train_texts: Sequence[str], queries: Mapping[str, Sequence[str]]) -> dict[str, np.ndarray]:
    """``{aspect: (N,) float64}``: the mean TF-IDF cosine of every training text to the aspect's query texts
    (module docstring).

    Raises:
        ValueError: no training text, or an aspect without query texts.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer

    if not train_texts:
        raise ValueError("text_similarity needs at least one training text")
    empty = [a for a, texts in queries.items() if not texts]
    if empty:
        raise ValueError(f"aspects without query texts: {empty}")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    vectorizer.fit([*train_texts, *(t for texts in queries.values() for t in texts)])
    train = vectorizer.transform(train_texts)
    out = {}
    for aspect, texts in queries.items():
        centroid = np.asarray(vectorizer.transform(texts).mean(axis=0)).reshape(-1)
        out[aspect] = np.asarray(train @ centroid, dtype=np.float64).reshape(-1)
    return out
