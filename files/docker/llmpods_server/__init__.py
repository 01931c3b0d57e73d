"""llama-cpp-python's OpenAI-compatible server with a chat-aware ``/extras/tokenize/count``."""
