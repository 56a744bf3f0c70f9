"""Versions spoken on the wire.

Layer: L0 leaf. Imports: nothing.
"""

__version__ = "0.1.0"
# Bumped whenever a frame or message layout changes; peers with another value refuse to talk.
PROTOCOL_VERSION = 3
