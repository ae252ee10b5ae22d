def grade(score):
    """'A' from 90 up, 'B' from 75 up, else 'C'."""
    if score > 90:
        return "A"
    if score >= 75:
        return "B"
    return "C"
