"""Offline demo."""
