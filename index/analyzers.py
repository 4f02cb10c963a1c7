"""The text analyzers of BM25 fields: one tantivy ``TextAnalyzer`` per ``Analyzer`` name.

The same analyzer turns a document's text into indexed terms (tantivy calls it by the
field's tokenizer name) and a query's text into the terms Braid searches for, so the
two sides can never disagree.

  default     tantivy's built-in "default": split on non-alphanumerics, drop tokens
              over 40 bytes, lower-case
  en_stem     tantivy's built-in "en_stem": default + Snowball English stemming
  english     words of two or more word characters (Unicode ``\\w\\w+``, as scikit-learn
              and bm25s tokenize), drop tokens over 40 bytes, lower-case, drop
              Lucene's 33 English stop words, Snowball English stemming. The analyzer
              for English prose; ``braid eval`` uses it (docs/relevance.md)
  whitespace  tantivy's built-in "whitespace": split on whitespace only, case kept
  raw         tantivy's built-in "raw": the whole value is one term

The four built-in names are rebuilt here with tantivy's own components and the same
settings, for the query side; tantivy indexes with its built-ins. ``english`` is not
built in, so it is registered on every index this process opens (tantivy does not
persist analyzers), under its name.
"""

from __future__ import annotations

from collections.abc import Callable

import tantivy

from .schema import Analyzer

_MAX_TOKEN_BYTES = 40
_Filter = tantivy.Filter


def _simple(*filters: tantivy.Filter) -> tantivy.TextAnalyzer:
    builder = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.simple())
    for step in (_Filter.remove_long(_MAX_TOKEN_BYTES), _Filter.lowercase(), *filters):
        builder = builder.filter(step)
    return builder.build()


def _english() -> tantivy.TextAnalyzer:
    builder = tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.regex(r"\w\w+"))
    for step in (
        _Filter.remove_long(_MAX_TOKEN_BYTES),
        _Filter.lowercase(),
        _Filter.stopword("english"),
        _Filter.stemmer("english"),
    ):
        builder = builder.filter(step)
    return builder.build()


_BUILDERS: dict[Analyzer, Callable[[], tantivy.TextAnalyzer]] = {
    Analyzer.DEFAULT: _simple,
    Analyzer.EN_STEM: lambda: _simple(_Filter.stemmer("english")),
    Analyzer.ENGLISH: _english,
    Analyzer.WHITESPACE: lambda: tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.whitespace()).build(),
    Analyzer.RAW: lambda: tantivy.TextAnalyzerBuilder(tantivy.Tokenizer.raw()).build(),
}
# Analyzers tantivy does not ship: each index registers them when it opens.
CUSTOM = (Analyzer.ENGLISH,)


def build(kind: Analyzer) -> tantivy.TextAnalyzer:
    """A fresh analyzer of the given kind."""
    return _BUILDERS[kind]()
