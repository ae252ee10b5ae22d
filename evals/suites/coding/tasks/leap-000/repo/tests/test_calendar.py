from survey.calendar_rules import is_leap


def test_years():
    for year, leap in {2024: True, 1800: False, 2100: False, 2001: False, 2012: True}.items():
        assert is_leap(year) == leap, year


def test_four_hundred():
    assert is_leap(2000)
    assert is_leap(1600)
