from survey.shipping import girth_cm


def test_girth():
    assert girth_cm(0.2, 0.8, 0.3) == 240.0
