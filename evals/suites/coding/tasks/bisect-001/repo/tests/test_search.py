from metrics.search import find_index

VALUES = [6, 8, 12, 23, 27, 29, 30, 32, 60, 76]


def test_every_value_is_found():
    for i, x in enumerate(VALUES):
        assert find_index(VALUES, x) == i


def test_absent():
    assert find_index(VALUES, 1000) == -1
    assert find_index([], 3) == -1
