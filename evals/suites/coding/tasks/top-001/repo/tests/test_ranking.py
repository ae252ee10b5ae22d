from catalog.ranking import top


def test_top():
    assert top({'eli': 28, 'hal': 48, 'ben': 20, 'ana': 61, 'dee': 62}, 3) == ['dee', 'ana', 'hal']
