"""Models: the two CLIP towers (OpenAI architecture), the dense task heads and their assembly."""
