from metrics.grading import grade


def test_grades():
    assert grade(93) == "A"
    assert grade(76) == "B"
    assert grade(74) == "C"


def test_boundaries():
    assert grade(90) == "A"
    assert grade(75) == "B"
