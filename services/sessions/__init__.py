"""Sessions service: the conversation engine and the public `parley.v1.Sessions` API.

conversation.py (the loop: ASR → turn → LLM → TTS → output, streaming, barge-in,
per-turn traces) · registry.py (session lifecycle, per tenant) · gateway.py (API keys
and the stream relay both transports share) · servicer.py (gRPC) · http.py (REST and
WebSocket).
"""
