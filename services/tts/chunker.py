"""Cuts streamed LLM text into clauses that can be spoken on their own.

The first clause is cut as early as punctuation allows (latency); later ones at
sentence ends or clause punctuation once long enough (prosody).
"""

from __future__ import annotations

import re

_SENTENCE_END = re.compile(r"[.!?…]+[\"”')\]]*(?=\s)")
_CLAUSE_END = re.compile(r"[,;:—–]+(?=\s)")


class ClauseChunker:
    def __init__(self, first_min_words: int = 2, min_words: int = 5, max_words: int = 16) -> None:
        self.first_min_words = first_min_words
        self.min_words = min_words
        self.max_words = max_words
        self._buffer = ""
        self._emitted = 0

    def push(self, text: str) -> list[str]:
        """Add text; return the clauses now complete."""
        self._buffer += text
        out: list[str] = []
        while (clause := self._next_clause()) is not None:
            out.append(clause)
        return out

    def flush(self) -> list[str]:
        """The rest of the text, as a final clause (if it holds any words)."""
        rest, self._buffer = self._buffer.strip(), ""
        if rest:
            self._emitted += 1
            return [rest]
        return []

    def _next_clause(self) -> str | None:
        buf = self._buffer
        min_words = self.first_min_words if self._emitted == 0 else self.min_words
        cut = None
        for pattern, needs_len in ((_SENTENCE_END, False), (_CLAUSE_END, True)):
            for m in pattern.finditer(buf):
                words = len(buf[: m.end()].split())
                if words >= (min_words if needs_len else 1):
                    cut = m.end() if cut is None else min(cut, m.end())
                    break
        if cut is None:
            # A run-on clause is cut at a word boundary once it has max_words complete words.
            matches = list(re.finditer(r"\S+(?=\s)", buf))
            if len(matches) < self.max_words:
                return None
            cut = matches[self.max_words - 1].end()
        clause, self._buffer = buf[:cut].strip(), buf[cut:].lstrip()
        if not clause:
            return None
        self._emitted += 1
        return clause
