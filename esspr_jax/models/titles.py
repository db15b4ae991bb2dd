"""A product title as text, the one reading both tokenizers (`tokenizer.py` and
`dual_tokenizer.py`) share, so the CLIP/SigLIP path and the WordPiece path agree on
what an empty or missing title is."""


def title_text(title) -> str:
  """A title as text; anything that is not text (None, NaN, numbers) is empty."""
  if isinstance(title, str):
    return title
  if isinstance(title, (bytes, bytearray)):  # TFDS hands text back as bytes
    return bytes(title).decode("utf-8", errors="replace")
  return ""
