def mean(values):
    """The arithmetic mean of values; None for no values."""
    return sum(values) / len(values)
