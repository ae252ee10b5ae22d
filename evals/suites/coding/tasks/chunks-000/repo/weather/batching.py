def chunks(values, n):
    """values cut into lists of n; the last one may be shorter."""
    whole = len(values) - len(values) % n
    return [values[i : i + n] for i in range(0, whole, n)]
