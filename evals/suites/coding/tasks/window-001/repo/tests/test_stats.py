from catalog.stats import moving_sums


def test_moving_sums():
    assert moving_sums([-6, 4, 12, -6, 7, 18], 2) == [-2, 16, 6, 1, 25]


def test_whole_list_is_one_window():
    assert moving_sums([1, 2, 3], 3) == [6]
