"""Real protocol peers for the tests: an OpenSSH server, an ADB device endpoint, a TCP proxy."""
