"""Generation stages: attribute extraction with a Flax LLM and prompt building."""
