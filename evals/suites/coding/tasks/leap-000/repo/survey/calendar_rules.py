def is_leap(year):
    """Gregorian leap years: divisible by 4, except centuries not divisible by 400."""
    if year % 100 == 0:
        return False
    return year % 4 == 0
