"""Helpers the test files (and the board benchmarks) share: sshd labs, pty pairs, an emulated Pi, builders."""
