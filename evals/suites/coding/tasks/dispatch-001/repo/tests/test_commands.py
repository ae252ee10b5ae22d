from weather.commands import run


def test_commands_in_any_case():
    assert run('Pause') == 'pause'
    assert run('STOP') == 'stop'
    assert run('start') == 'start'
