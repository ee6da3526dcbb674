"""Template sae-lightning plugin distribution (see docs/writing-a-plugin.md)."""
