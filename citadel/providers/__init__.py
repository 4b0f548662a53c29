"""Encryption providers: the embedded local keyring and Evervault."""
