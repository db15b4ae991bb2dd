"""The training input: TFDS builder, image decoding, the Grain pipeline."""
