"""Record and config contracts: every table and the recipe are defined here once."""
