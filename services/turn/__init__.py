"""Turn service: voice activity plus a model of turn completion.

engine.py (VAD + transcript completeness → end-of-turn) · servicer.py (gRPC `parley.v1.Turn`).
"""
