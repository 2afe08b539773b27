"""Time-boxed hypothesis fuzzing of every decoder that reads bytes from a peer or a file.

See ``tests/fuzz/profile.py`` for the example budget (``VOLUNTEER_FUZZ_EXAMPLES``).
"""
