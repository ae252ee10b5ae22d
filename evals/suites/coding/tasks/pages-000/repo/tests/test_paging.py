from metrics.paging import page

ITEMS = ['met-0', 'met-1', 'met-2', 'met-3', 'met-4', 'met-5', 'met-6', 'met-7', 'met-8', 'met-9', 'met-10']


def test_first_page():
    assert page(ITEMS, 1, 3) == ITEMS[:3]


def test_later_page():
    assert page(ITEMS, 3, 3) == ['met-6', 'met-7', 'met-8']
