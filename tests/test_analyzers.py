"""The query side's analyzers produce exactly the terms tantivy indexed with the same analyzer name."""

from __future__ import annotations

import numpy as np
import pytest
import tantivy

from braid.index import analyzers
from braid.index.schema import Analyzer, TextFieldSpec
from braid.index.text import TextIndex

TRICKY = (
    "The QUICK brown-fox's naïve Straße, U.S.A. x 42 e-mail: a.b@c.org\tTabs\nnewline "
    "Ünïcödé 東京 running ran runs " + "z" * 41 + " " + "y" * 40
)


@pytest.mark.parametrize("kind", list(Analyzer))
def test_every_query_term_matches_the_indexed_document(tmp_path, kind):
    index = TextIndex(tmp_path / kind.value, (TextFieldSpec("body", kind),))
    index.add(7, {"body": TRICKY})
    index.add(8, {"body": "unrelated words entirely"})
    index.commit()
    terms = analyzers.build(kind).analyze(TRICKY)
    assert terms, kind
    allowed = np.ones(9, bool)
    for term in set(terms):
        query = tantivy.Query.term_query(index.schema, "body", term)
        labels, _ = index.search(query, 5, allowed, 2, filtered=False)
        assert labels.tolist() == [7], (kind, term)
    index.close()


def test_english_analyzer_terms():
    terms = analyzers.build(Analyzer.ENGLISH).analyze("The Runners ran a 42km Marathon, x-rays and U.S. ÉTUDES")
    assert terms == ["runner", "ran", "42km", "marathon", "ray", "étude"]
