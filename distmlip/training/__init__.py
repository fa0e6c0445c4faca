"""distmlip.training"""
