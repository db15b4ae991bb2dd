"""Names both sides of the config boundary agree on: the config validates against them,
the code that acts on them imports them from here (the config imports nothing back)."""

# The three views of a product, in canonical order: image-only, text-only, fused.
MODALITIES = ("i", "t", "m")
# How eval (and train, after cropping) fits a photo into the model's square input.
RESIZE_MODES = ("pad", "crop", "squash")
