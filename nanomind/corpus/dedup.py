"""Duplicate removal, first occurrence kept: exact (hash of the whitespace-collapsed text) and near-duplicate
(MinHash over character n-grams, LSH to find candidates, then the estimated Jaccard similarity to confirm).

Character n-grams rather than words, because Chinese has no spaces: two 200-character texts differing in three
characters share ~88% of their 5-grams, while unrelated texts in the same language share almost none.
"""

from __future__ import annotations

import hashlib

import numpy as np

from nanomind.corpus import require


def _collapse(text: str) -> str:
    return " ".join(text.split())


class ExactDedup:
    """Remembers a 16-byte digest per distinct text; `check` names the first holder of a repeated text."""

    def __init__(self) -> None:
        self._seen: dict[bytes, str] = {}

    def check(self, text: str, where: str) -> str | None:
        key = hashlib.blake2b(_collapse(text).encode("utf-8"), digest_size=16).digest()
        if key in self._seen:
            return self._seen[key]
        self._seen[key] = where
        return None


class NearDedup:
    """Near-duplicate detection with datasketch's MinHash LSH: a text whose estimated Jaccard similarity of
    character n-grams to a kept text is >= threshold is a duplicate of it."""

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> None:
        datasketch = require("datasketch", "datasketch", "near-duplicate removal (--near-dedup)")
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self._minhash = datasketch.MinHash
        self._lsh = datasketch.MinHashLSH(threshold=threshold, num_perm=num_perm)
        # One MinHash built once lends its permutations to all others: drawing them per text costs more than hashing.
        self._template = datasketch.MinHash(num_perm=num_perm, seed=seed)
        self._signatures: list[np.ndarray] = []
        self._where: list[str] = []

    def shingles(self, text: str) -> set[bytes]:
        s = _collapse(text).lower()
        n = self.ngram
        return {s[i : i + n].encode("utf-8") for i in range(max(1, len(s) - n + 1))}

    def signature(self, text: str):  # -> datasketch.MinHash
        m = self._minhash(num_perm=self.num_perm, seed=self.seed, permutations=self._template.permutations,
                          scheme=self._template.scheme)  # fmt: skip
        m.update_batch(self.shingles(text))
        return m

    def check(self, text: str, where: str) -> tuple[str, float] | None:
        """(first holder, estimated similarity) if `text` near-duplicates a kept text; else keep it and None."""
        m = self.signature(text)
        best: tuple[str, float] | None = None
        for key in self._lsh.query(m):
            similarity = float(np.mean(self._signatures[key] == m.hashvalues))
            if similarity >= self.threshold and (best is None or similarity > best[1]):
                best = (self._where[key], similarity)
        if best is not None:
            return best
        self._lsh.insert(len(self._where), m, check_duplication=False)
        self._signatures.append(m.hashvalues)
        self._where.append(where)
        return None
