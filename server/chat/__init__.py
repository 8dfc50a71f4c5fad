"""OpenAI Chat Completions with audio in and out."""
