def stem(filename, ext=".log"):
    """filename without the extension ext, when it ends with it."""
    return filename.rstrip(ext)
