def top(scores, n):
    """The names of the n highest scores, best first."""
    return sorted(scores, reverse=True)[:n]
