"""adapters/ingest"""
