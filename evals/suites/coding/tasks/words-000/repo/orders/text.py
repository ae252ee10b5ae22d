def word_count(text):
    """The number of words in text (separated by any whitespace)."""
    return len(text.split(" "))
