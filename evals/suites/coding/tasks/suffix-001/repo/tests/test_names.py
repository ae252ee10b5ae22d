from survey.names import stem


def test_stem():
    assert stem("backlog.log") == "backlog"
    assert stem("archive.zip") == "archive.zip"
