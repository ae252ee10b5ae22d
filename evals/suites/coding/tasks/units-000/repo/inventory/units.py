def m_to_cm(metres):
    return metres * 10
