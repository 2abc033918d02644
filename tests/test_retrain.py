"""The recipe's last step's numbers: Spearman's rho between subset and full val acc (the retrain
itself runs end to end in test_report.py)."""

import pytest

from hpo.retrain import spearman


def test_spearman_is_the_rank_correlation():
    assert spearman([0.3, 0.5, 0.4], [0.31, 0.52, 0.45]) == pytest.approx(1.0)  # same order, other values
    assert spearman([0.3, 0.5, 0.4], [0.6, 0.4, 0.5]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486833)  # a tie: average ranks


def test_spearman_is_none_where_undefined():
    assert spearman([0.5], [0.6]) is None
    assert spearman([0.5, 0.5], [0.6, 0.7]) is None
    assert spearman([], []) is None
