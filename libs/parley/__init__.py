"""Parley: real-time conversational video avatars.

`parley` is the code shared by the services (audio frames, clock, metrics,
tracing, config, generated protocol stubs), the CLI and the Python client.
Each service lives in `services/<name>/`.
"""

__version__ = "0.1.0"
