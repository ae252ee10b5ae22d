from survey.records import tagged


def test_tags_are_not_shared():
    assert tagged("a")["tags"] == ["item"]
    assert tagged("b")["tags"] == ["item"]


def test_given_tags():
    assert tagged("c", ['sale', 'rare'])["tags"] == ['sale', 'rare', 'item']
