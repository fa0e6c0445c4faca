"""distmlip.distributed"""
