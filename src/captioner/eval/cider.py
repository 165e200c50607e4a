"""CIDEr-D on token ids, vectorised: the self-critical reward, scored on every training step.

The same arithmetic as pycocoevalcap's `Cider` (Vedantam et al. 2015, the "-D" variant: tf-idf n-gram vectors for
n = 1..4, clipped overlap, a Gaussian penalty (sigma 6) on the length difference, the mean over n and references,
times 10) with two differences of use, not of maths: captions are token-id sequences rather than space-separated
words (pycocoevalcap on the ids written as words gives the same numbers: tests/eval/test_cider.py), and the
document frequencies come from a fixed corpus (the training references, as in Rennie et al. 2017) instead of from
the captions being scored. pycocoevalcap counts a caption's length as its number of bigrams; so does this.

N-grams are packed into one uint64 each (16 bits per token, id + 1, so n is implied by the magnitude) and joined
with numpy sorts, never Python dicts. Shapes: M candidates, G reference groups (images), R references.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from captioner.errors import UserError

N = 4
SIGMA = 6.0
MAX_ID = 2**16 - 2  # id + 1 must fit in 16 bits


def _padded(seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """(S, L) uint64 of id + 1, 0 after each sequence's end."""
    lengths = np.array([len(s) for s in seqs], dtype=np.int64)
    ids = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(lengths.sum()))
    if len(ids) and (ids.min() < 0 or ids.max() > MAX_ID):
        raise UserError(f"CIDEr-D takes token ids in [0, {MAX_ID}], got {ids.min()}..{ids.max()}")
    out = np.zeros((len(seqs), int(lengths.max(initial=0)) + N), dtype=np.uint64)
    inside = np.arange(out.shape[1])[None, :] < lengths[:, None]  # (S, L + N), row-major as ids
    out[inside] = ids.astype(np.uint64) + 1
    return out


def ngram_counts(seqs: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct n-gram (n = 1..4) of each sequence: (row (E,), key (E,) uint64, count (E,)), sorted by
    (row, key)."""
    padded = _padded(seqs)  # (S, L + N)
    S, width = padded.shape
    rows, keys = [], []
    for n in range(1, N + 1):
        span = width - N
        key = np.zeros((S, span), dtype=np.uint64)
        for j in range(n):
            key |= padded[:, j : j + span] << np.uint64(16 * j)
        whole = padded[:, n - 1 : n - 1 + span] != 0  # the window's last token is inside the sequence
        r, _ = np.nonzero(whole)
        rows.append(r)
        keys.append(key[whole])
    return _distinct(np.concatenate(rows), np.concatenate(keys), counts=True)


def _distinct(row: np.ndarray, key: np.ndarray, counts: bool = False):
    """The distinct (row, key) pairs, sorted: their keys (and rows and multiplicities with `counts`)."""
    order = np.lexsort((key, row))
    row, key = row[order], key[order]
    start = np.ones(len(row), dtype=bool)
    start[1:] = (row[1:] != row[:-1]) | (key[1:] != key[:-1])
    first = np.flatnonzero(start)
    if not counts:
        return key[first]
    return row[first], key[first], np.diff(np.append(first, len(row)))


def ngram_order(key: np.ndarray) -> np.ndarray:
    """0-based n - 1 of each packed n-gram."""
    return (key >= 2**16).astype(np.int64) + (key >= 2**32) + (key >= 2**48)


class CiderD:
    """CIDEr-D with document frequencies from `corpus`: one list of reference token-id sequences per image."""

    def __init__(self, keys: np.ndarray, df: np.ndarray, n_images: int, sigma: float = SIGMA):
        self.keys, self.df, self.n_images, self.sigma = keys, df, int(n_images), sigma
        self.ref_len = np.log(float(self.n_images))

    @classmethod
    def from_corpus(cls, corpus: Sequence[Sequence[Sequence[int]]], chunk: int = 20_000) -> CiderD:
        """Document frequency of an n-gram: the number of images with it in any of their references."""
        per_image = []
        for start in range(0, len(corpus), chunk):
            refs = corpus[start : start + chunk]
            image = np.repeat(np.arange(len(refs)), [len(r) for r in refs])
            row, key, _ = ngram_counts([s for r in refs for s in r])
            per_image.append(_distinct(image[row], key))
        keys, df = np.unique(np.concatenate(per_image or [np.zeros(0, np.uint64)]), return_counts=True)
        return cls(keys, df.astype(np.float64), len(corpus))

    def save(self, path: str | os.PathLike) -> None:
        from captioner.io import atomic_path

        with atomic_path(Path(path)) as tmp, open(tmp, "wb") as f:
            np.savez(f, keys=self.keys, df=self.df, n_images=self.n_images)

    @classmethod
    def load(cls, path: str | os.PathLike) -> CiderD:
        try:
            with np.load(path) as data:
                return cls(data["keys"], data["df"], int(data["n_images"]))
        except (OSError, KeyError, ValueError) as err:
            raise UserError(f"{path}: not a CIDEr-D document-frequency file ({err})") from None

    def _vectors(self, seqs: Sequence[Sequence[int]]):
        """tf-idf entries (row, key, weight, order) plus per-row norms (S, N) and bigram counts (S,)."""
        row, key, tf = ngram_counts(seqs)
        df = np.zeros(len(key))
        if len(self.keys):
            at = np.searchsorted(self.keys, key).clip(max=len(self.keys) - 1)
            df = np.where(self.keys[at] == key, self.df[at], 0.0)
        weight = tf * (self.ref_len - np.log(np.maximum(1.0, df)))
        order = ngram_order(key)
        norm = np.bincount(row * N + order, weights=weight**2, minlength=len(seqs) * N)
        length = np.bincount(row[order == 1], weights=tf[order == 1], minlength=len(seqs))
        return row, key, weight, order, np.sqrt(norm).reshape(-1, N), length

    def __call__(
        self,
        candidates: Sequence[Sequence[int]],
        references: Sequence[Sequence[Sequence[int]]],
        groups: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """CIDEr-D (M,) of each candidate against the references of its group: `references[groups[i]]`
        (default: candidate i against references[i]; k samples of one image share one group)."""
        M = len(candidates)
        group = np.arange(M) if groups is None else np.asarray(groups, dtype=np.int64)
        n_refs = np.array([len(r) for r in references], dtype=np.int64)  # (G,)
        if M == 0:
            return np.zeros(0)
        if (n_refs[group] == 0).any():
            raise UserError("CIDEr-D needs at least one reference per scored caption")
        first_ref = np.concatenate([[0], np.cumsum(n_refs)[:-1]])  # (G,)
        ref_group = np.repeat(np.arange(len(references)), n_refs)  # (R,)
        c_row, c_key, c_w, c_order, c_norm, c_len = self._vectors(candidates)
        r_row, r_key, r_w, _, r_norm, r_len = self._vectors([s for refs in references for s in refs])

        # join candidate and reference n-grams on (group, n-gram): dense n-gram ids make one int64 sort key
        uniq, inverse = np.unique(np.concatenate([c_key, r_key]), return_inverse=True)
        c_comp = group[c_row] * len(uniq) + inverse[: len(c_key)]
        r_comp = ref_group[r_row] * len(uniq) + inverse[len(c_key) :]
        by = np.argsort(r_comp, kind="stable")
        r_comp_sorted = r_comp[by]
        lo = np.searchsorted(r_comp_sorted, c_comp, "left")
        hits = np.searchsorted(r_comp_sorted, c_comp, "right") - lo
        c_idx = np.repeat(np.arange(len(c_comp)), hits)
        r_idx = by[np.arange(hits.sum()) - np.repeat(np.cumsum(hits) - hits, hits) + np.repeat(lo, hits)]
        slot = r_row[r_idx] - first_ref[ref_group[r_row[r_idx]]]  # reference's place among its group's
        R = int(n_refs.max())
        contrib = np.minimum(c_w[c_idx], r_w[r_idx]) * r_w[r_idx]
        at = (c_row[c_idx] * R + slot) * N + c_order[c_idx]
        val = np.bincount(at, weights=contrib, minlength=M * R * N).reshape(M, R, N)

        slots = np.arange(R)
        ref_of = first_ref[group][:, None] + slots  # (M, R) global reference index
        valid = slots[None, :] < n_refs[group][:, None]  # (M, R)
        ref_of = np.where(valid, ref_of, 0)
        denom = c_norm[:, None, :] * r_norm[ref_of]  # (M, R, N)
        val = np.where(denom != 0, val / np.where(denom != 0, denom, 1.0), val)
        delta = c_len[:, None] - r_len[ref_of]  # (M, R)
        val *= np.exp(-(delta**2) / (2 * self.sigma**2))[:, :, None]
        per_ref = np.where(valid, val.mean(axis=2), 0.0)  # (M, R)
        return per_ref.sum(axis=1) / n_refs[group] * 10.0
