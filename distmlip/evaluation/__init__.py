"""distmlip.evaluation"""
