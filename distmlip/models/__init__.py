"""distmlip.models"""
