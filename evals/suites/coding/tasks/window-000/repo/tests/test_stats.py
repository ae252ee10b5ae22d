from survey.stats import moving_sums


def test_moving_sums():
    assert moving_sums([-8, 15, -6, 9, 3, 9, -3, 11, -6], 2) == [7, 9, 3, 12, 12, 6, 8, 5]


def test_whole_list_is_one_window():
    assert moving_sums([1, 2, 3], 3) == [6]
