from inventory.names import stem


def test_stem():
    assert stem("sales.csv") == "sales"
    assert stem("archive.zip") == "archive.zip"
