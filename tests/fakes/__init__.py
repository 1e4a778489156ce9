"""Fake model services (real HTTP servers on 127.0.0.1) used by the tests."""
