"""Adversarial peers against a real daemon: a garbage peer on every protocol it serves."""
