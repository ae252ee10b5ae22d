from weather.batching import chunks


def test_even():
    assert chunks([1, 2, 3, 4], 2) == [[1, 2], [3, 4]]


def test_remainder_is_kept():
    assert chunks([5, 6, 7, 8, 9], 2) == [[5, 6], [7, 8], [9]]
