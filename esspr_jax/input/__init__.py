"""The training input: TFDS builder, image decoding, the tokenizer stage, the Grain pipeline."""
