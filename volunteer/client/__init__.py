"""Trainer-side client library: RemoteExpert, RemoteMixtureOfExperts and beam search over
the expert grid. Needs only ``volunteer.net`` and ``volunteer.wire``; never imports server code.
"""
