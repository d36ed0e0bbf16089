"""Text generation for the model stage of an LLM pipeline: the generator interface and a small
GPT-style decoder with random weights that runs on CPU (the platform, not the text, is under test)."""
