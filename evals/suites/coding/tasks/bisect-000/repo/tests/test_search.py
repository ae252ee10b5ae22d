from orders.search import find_index

VALUES = [5, 13, 22, 37, 58, 71, 94]


def test_every_value_is_found():
    for i, x in enumerate(VALUES):
        assert find_index(VALUES, x) == i


def test_absent():
    assert find_index(VALUES, 1000) == -1
    assert find_index([], 3) == -1
