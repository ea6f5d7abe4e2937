"""rephrase"""
