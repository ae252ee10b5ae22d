from fleet.grading import grade


def test_grades():
    assert grade(83) == "A"
    assert grade(61) == "B"
    assert grade(59) == "C"


def test_boundaries():
    assert grade(80) == "A"
    assert grade(60) == "B"
