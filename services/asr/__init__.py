"""ASR service: streaming speech recognition with partials and a fast final.

engine.py (VAD-gated streaming over an utterance decoder) · servicer.py (gRPC
`parley.v1.Asr`) · backends/whisper.py (Whisper via CTranslate2, embedded tiny.en).
"""
