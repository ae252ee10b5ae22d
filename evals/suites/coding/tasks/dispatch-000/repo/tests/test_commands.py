from fleet.commands import run


def test_commands_in_any_case():
    assert run('Pause') == 'pause'
    assert run('START') == 'start'
    assert run('stop') == 'stop'
