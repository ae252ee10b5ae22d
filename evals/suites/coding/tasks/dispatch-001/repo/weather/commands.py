from weather.registry import HANDLERS, register


def run(name):
    """Runs the handler registered for command `name` (any case)."""
    return HANDLERS[name]()


@register('Pause')
def pause_handler():
    return 'pause'


@register('Stop')
def stop_handler():
    return 'stop'


@register('Start')
def start_handler():
    return 'start'
