from catalog.text import word_count


def test_simple():
    assert word_count("one two three") == 3


def test_any_whitespace():
    assert word_count('gamma  beta\ngamma omega kappa ') == 5
    assert word_count("") == 0
