def grade(score):
    """'A' from 80 up, 'B' from 60 up, else 'C'."""
    if score > 80:
        return "A"
    if score >= 60:
        return "B"
    return "C"
