HANDLERS = {}


def register(name):
    """Registers a handler under its command name; names are case-insensitive."""

    def wrap(fn):
        HANDLERS[name.lower()] = fn
        return fn

    return wrap
