def find_index(sorted_values, x):
    """Index of x in the ascending list sorted_values, or -1 when it is absent."""
    lo, hi = 0, len(sorted_values) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sorted_values[mid] == x:
            return mid
        if sorted_values[mid] < x:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1
