"""distmlip.data"""
