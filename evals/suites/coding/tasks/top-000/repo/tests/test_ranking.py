from inventory.ranking import top


def test_top():
    assert top({'dee': 81, 'ana': 12, 'hal': 84, 'gus': 18, 'cy': 20}, 2) == ['hal', 'dee']
