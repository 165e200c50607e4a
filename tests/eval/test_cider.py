"""The self-critical reward's CIDEr-D (eval/cider.py) is pycocoevalcap's `Cider` on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioner.errors import UserError
from captioner.eval.cider import CiderD, ngram_counts


def as_words(ids) -> str:
    return " ".join(f"w{i}" for i in ids)


def reference_scores(candidates, references) -> np.ndarray:
    """pycocoevalcap's per-caption CIDEr-D, each candidate its own image (document frequencies from these refs)."""
    gts = {i: [as_words(r) for r in refs] for i, refs in enumerate(references)}
    res = {i: [as_words(c)] for i, c in enumerate(candidates)}
    return Cider().compute_score(gts, res)[1]


def random_captions(rng, n_images: int, vocab: int = 30):
    """Short captions over a small vocabulary, so n-grams repeat within and across images; some candidates copy a
    reference, some are empty or one token, lengths vary (the length penalty)."""
    references = [
        [rng.integers(0, vocab, rng.integers(1, 14)).tolist() for _ in range(rng.integers(1, 6))]
        for _ in range(n_images)
    ]
    candidates = []
    for refs in references:
        kind = rng.integers(0, 4)
        if kind == 0:
            candidates.append(list(refs[0]))
        elif kind == 1:
            candidates.append(rng.integers(0, vocab, rng.integers(0, 3)).tolist())
        else:
            candidates.append(rng.integers(0, vocab, rng.integers(3, 16)).tolist())
    return candidates, references


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_pycocoevalcap_on_the_same_inputs(seed):
    rng = np.random.default_rng(seed)
    candidates, references = random_captions(rng, 120)
    ours = CiderD.from_corpus(references)(candidates, references)
    np.testing.assert_allclose(ours, reference_scores(candidates, references), rtol=1e-9, atol=1e-12)
    assert (ours > 1).any() and (ours == 0).any()  # copies score high, empty candidates zero


def test_samples_of_one_image_share_its_references_and_large_ids_pack():
    rng = np.random.default_rng(3)
    references = [[(rng.integers(50_000, 50_257, 8)).tolist() for _ in range(5)] for _ in range(6)]
    scorer = CiderD.from_corpus(references)
    samples = [rng.integers(50_000, 50_257, 6).tolist() for _ in range(6 * 4)]
    groups = np.repeat(np.arange(6), 4)
    expected = reference_scores(samples, [references[g] for g in groups])
    # pycocoevalcap took its document frequencies from 24 "images" (4 copies of each): rescale to compare
    repeated = CiderD.from_corpus([references[g] for g in groups])
    np.testing.assert_allclose(repeated(samples, references, groups), expected, rtol=1e-9)
    assert not np.allclose(scorer(samples, references, groups), expected)  # the corpus matters


def test_document_frequencies_round_trip(tmp_path):
    references = [[[1, 2, 3], [2, 3]], [[4, 5, 6, 7]], [[1, 2]]]
    scorer = CiderD.from_corpus(references)
    scorer.save(tmp_path / "df.npz")
    loaded = CiderD.load(tmp_path / "df.npz")
    cands = [[1, 2, 3], [4, 5], [9]]
    np.testing.assert_array_equal(loaded(cands, references), scorer(cands, references))
    (tmp_path / "bad.npz").write_text("not numpy")
    with pytest.raises(UserError, match=r"bad\.npz: not a CIDEr-D"):
        CiderD.load(tmp_path / "bad.npz")


def test_ngrams_are_counted_once_per_caption_with_their_multiplicity():
    row, _, count = ngram_counts([[7, 7, 7], []])
    assert (row == 0).all()  # the empty caption has none
    assert sorted(count.tolist()) == [1, 2, 3]  # (7,7,7) once, (7,7) twice, (7,) three times


def test_ids_that_do_not_pack_are_refused():
    with pytest.raises(UserError, match="token ids"):
        ngram_counts([[70_000]])
