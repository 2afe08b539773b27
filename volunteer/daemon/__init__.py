"""The volunteer daemon: supervisor lifecycle, settings, hardware detection, control API,
health snapshot, drain and leave.
"""
