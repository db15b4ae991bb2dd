"""End-to-end recipes: one command each, from public data to a results table."""
