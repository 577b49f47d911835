"""shim/centrifuge"""
