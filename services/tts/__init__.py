"""TTS service: streaming text in, audio with phoneme/viseme timings out.

engine.py (clause chunking, cancellation, metrics) · servicer.py (gRPC `parley.v1.Tts`)
· backends/hibari.py (embedded neural voice with the model's own phoneme durations).
"""
