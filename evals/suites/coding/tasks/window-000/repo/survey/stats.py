def moving_sums(values, width):
    """Sums of every run of `width` consecutive values, in order."""
    out = []
    for i in range(len(values) - width):
        out.append(sum(values[i : i + width]))
    return out
