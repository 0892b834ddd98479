"""LLM service: streaming chat completions with a cached persona prefix.

engine.py (plain async) · servicer.py (gRPC `parley.v1.Llm`) · backends/ (llama.cpp
embedded default, OpenAI-compatible servers, Triton).
"""
