"""tokenrelay: OpenAI-compatible LLM serving over Redis streams."""

__version__ = "0.1.0"
