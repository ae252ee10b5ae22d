from ledger.summary import mean


def test_mean():
    assert mean([15, 29, 38, 28, 37, 10]) == 26.166666666666668


def test_empty():
    assert mean([]) is None
