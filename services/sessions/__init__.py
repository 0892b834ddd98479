"""Sessions service: the conversation engine and the public `parley.v1.Sessions` API.

conversation.py (the loop: ASR → turn → LLM → TTS → output, streaming, barge-in,
per-turn traces) · registry.py (session lifecycle) · servicer.py (gRPC).
"""
