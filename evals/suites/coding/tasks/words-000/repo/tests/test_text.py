from orders.text import word_count


def test_simple():
    assert word_count("one two three") == 3


def test_any_whitespace():
    assert word_count('beta  beta\ngamma kappa ') == 4
    assert word_count("") == 0
