"""adapters/auth"""
