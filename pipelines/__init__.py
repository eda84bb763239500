"""Recipes (YAML) and built-in prompt sets; ``schemas.recipe`` loads them."""
