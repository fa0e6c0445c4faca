"""distmlip.gpr"""
