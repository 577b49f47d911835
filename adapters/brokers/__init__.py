"""adapters/brokers"""
