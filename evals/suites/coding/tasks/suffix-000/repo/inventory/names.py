def stem(filename, ext=".csv"):
    """filename without the extension ext, when it ends with it."""
    return filename.rstrip(ext)
