"""Hard negatives mined from the training catalog during training (docs/losses.md,
"Hard negatives"): mine.py (the nearest non-positives), catalog.py (the listings and
who is whose positive), feed.py (the mined table as a batch side), miner.py (when to
mine, at what cost, and the saved versions)."""
