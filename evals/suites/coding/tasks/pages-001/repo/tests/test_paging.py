from roster.paging import page

ITEMS = ['ros-0', 'ros-1', 'ros-2', 'ros-3', 'ros-4', 'ros-5', 'ros-6', 'ros-7', 'ros-8', 'ros-9']


def test_first_page():
    assert page(ITEMS, 1, 4) == ITEMS[:4]


def test_later_page():
    assert page(ITEMS, 2, 4) == ['ros-4', 'ros-5', 'ros-6', 'ros-7']
