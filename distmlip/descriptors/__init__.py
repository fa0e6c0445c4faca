"""distmlip.descriptors"""
