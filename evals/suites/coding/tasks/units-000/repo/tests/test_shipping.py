from inventory.shipping import girth_cm


def test_girth():
    assert girth_cm(0.4, 0.2, 0.7) == 220.0
