from fleet.summary import mean


def test_mean():
    assert mean([42, 10, 6, 28, 29, 6]) == 20.166666666666668


def test_empty():
    assert mean([]) is None
