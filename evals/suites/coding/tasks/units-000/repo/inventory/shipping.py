from inventory.units import m_to_cm


def girth_cm(length_m, width_m, height_m):
    """Length plus twice width and height, in centimetres."""
    return round(m_to_cm(length_m + 2 * (width_m + height_m)), 6)
