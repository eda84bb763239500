"""Everything that transforms data, model engines included; one stage per module."""
