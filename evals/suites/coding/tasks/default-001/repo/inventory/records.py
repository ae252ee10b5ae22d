def tagged(name, tags=[]):
    """A record of name with its tags (a new list each call)."""
    tags.append("item")
    return {"name": name, "tags": tags}
