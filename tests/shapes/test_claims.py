"""Reading claims back: true claims hold, false ones do not, and unreadable ones are errors."""

import pytest

from tests.shapes.claims import claim_holds
from tests.shapes.test_world import scene


def test_claims_are_checked_not_assumed():
    sc = scene(
        ("red", "circle", "small", 0, 0), ("blue", "square", "large", 0, 2), ("blue", "circle", "large", 2, 0)
    )
    assert claim_holds(sc, "the square is blue.")
    assert not claim_holds(sc, "the square is red.")
    assert claim_holds(sc, "the red circle is to the left of the square.")
    assert not claim_holds(sc, "the red circle is below the square.")
    assert claim_holds(sc, "the small circle is above the large circle.")
    assert claim_holds(sc, "the red object is a circle.")
    assert not claim_holds(sc, "the red object is a square.")
    assert claim_holds(sc, "the square is large and blue.")
    assert claim_holds(sc, "the square is in the top right corner.")
    assert claim_holds(sc, "the number of objects in the image is three.")
    assert not claim_holds(sc, "there are two objects.")
    with pytest.raises(ValueError, match="names 2 objects"):
        claim_holds(sc, "the circle is red.")
    with pytest.raises(ValueError, match="cannot parse"):
        claim_holds(sc, "the square is happy.")
