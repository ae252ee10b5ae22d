from orders.calendar_rules import is_leap


def test_years():
    for year, leap in {1999: False, 2024: True, 2004: True, 2023: False, 2100: False}.items():
        assert is_leap(year) == leap, year


def test_four_hundred():
    assert is_leap(2000)
    assert is_leap(1600)
