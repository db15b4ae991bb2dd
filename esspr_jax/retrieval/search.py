"""Search an export (export.py): by listing id, image, text, or image + modifier words.

Python API:

    s = Searcher.open(export_dir)                         # id queries: no model needed
    s = Searcher.open(export_dir, config=config, checkpoint=run_dir)  # + image/text queries
    s = Searcher(export_dir, model=model, params=params, config=config)  # in-process model

    s.by_id('L123', k=20, gallery='m', more_suppliers=True, category=None) -> [Hit]
    s.by_image('photo.jpg', k=20, gallery='m')            # query modality i
    s.by_text('red mug', k=20, gallery='m')               # query modality t
    s.by_image_text('owl_mug.jpg', '3D frog', k=20)       # fused m: interactive search
    s.duplicates('supplier_7', threshold=0.95, modality='m') -> [(Hit, Hit, score)]
    s.write_html(path, title, hits, query_image=None, query_text='')

`search_from_config(config, workdir, export_dir, ...)` is `esspr-jax --mode=search`.

Hybrid (`hybrid=True` on by_id / by_text, `eval.search.hybrid` for the command): the
dense top-N and the title TF-IDF top-N (N = `eval.hybrid.candidates`, lexical.py over
the export's titles) are pooled, both scores taken for every pooled listing, each
normalised over that pool and fused (`eval.hybrid.method`, `weight`, `rrf_k`;
fusion.py); a hit's score is then the fused score. The query title is the text query,
or the listing's own title for an id query; galleries 't' and 'm' only.

Filters: `more_suppliers` drops hits from the query listing's supplier (or from
`exclude_supplier` for image/text queries); `category` keeps one leaf category. The
index is over-fetched until k hits survive the filters (or the gallery is exhausted).

Bad input raises a clear error: unknown listing id, unreadable image, empty text, a
modality the export was not built for, a model whose embedding size differs from the
index, or a checkpoint whose model config differs from the one that made the export.
"""
import dataclasses
import html
import pathlib
import re
from typing import Sequence

import numpy as np

from esspr_jax.errors import ConfigError, DataError
from esspr_jax.input import images
from esspr_jax.models.tokenizer import Tokenizer
from esspr_jax.retrieval import embed as embed_lib
from esspr_jax.retrieval import export as export_lib
from esspr_jax.retrieval import fusion
from esspr_jax.retrieval import index as index_lib
from esspr_jax.retrieval import integrity
from esspr_jax.retrieval import lexical as lexical_lib
from esspr_jax.retrieval import report as report_lib
from esspr_jax.retrieval import restore
from esspr_jax.retrieval import update as update_lib


def _one_query(query: np.ndarray, dim: int, gallery: str, k: int) -> np.ndarray:
  """The query as a [1, dim] float32 row; a DataError for a wrong width or k < 1."""
  query = np.asarray(query, np.float32).reshape(1, -1)
  if query.shape[1] != dim:
    raise DataError(f"query has {query.shape[1]} dimensions, the {gallery!r} index {dim}")
  if k < 1:
    raise DataError(f"k must be >= 1, got {k}")
  return query


@dataclasses.dataclass(frozen=True)
class Hit:
  listing_id: str
  score: float
  title: str = ""
  supplier_id: str = ""
  category: str = ""
  image: str = ""


class Searcher:
  """Queries over one export; the model is only needed for image/text queries."""

  def __init__(self, export_dir, *, model=None, params=None, config=None, tokenizer=None):
    self.dir = pathlib.Path(export_dir)
    self.manifest = export_lib.read_manifest(self.dir)
    self.assets = self.manifest["assets"]
    integrity.check_layout(self.dir, self.assets)   # before any file of it is read
    self.modalities = tuple(self.manifest["modalities"])
    self.dim = int(self.manifest["dim"])
    processes = self.manifest["processes"]
    delta = self.manifest.get("delta")
    integrity.verify(self.dir, self.assets, self.manifest["shards"]["ids"]
                     + self.manifest["listings"] + ([delta["dir"]] if delta else []))
    self.delta = update_lib.load_delta(self.dir, self.manifest)
    base_ids = np.asarray(export_lib.load_shards(self.dir, "ids", processes)).astype(str)
    self.base_size = len(base_ids)
    self.ids = base_ids if self.delta is None else np.concatenate([base_ids, self.delta["ids"]])
    self.retired = np.zeros(len(self.ids), bool)
    if self.delta is not None:
      self.retired[:self.base_size] = self.delta["retired"]
    self.row_of = {i: r for r, i in enumerate(self.ids.tolist()) if not self.retired[r]}
    self._load_listings()
    self._indexes: dict = {}
    self._vectors: dict = {}
    self._lexical = None
    self.model, self.params, self.config = model, params, config
    self.tokenizer = tokenizer
    if model is not None:
      self._check_model()

  @classmethod
  def open(cls, export_dir, *, config=None, checkpoint=None, step=None) -> "Searcher":
    """With `config`, restores the export's checkpoint (or `checkpoint`) for image/text queries."""
    searcher = cls(export_dir)
    searcher.config = config
    if config is None:
      return searcher
    source = checkpoint or searcher.manifest.get("checkpoint")
    if not source:
      raise DataError(f"export {export_dir} names no checkpoint; pass checkpoint=")
    restore.check_same_model_config(searcher.manifest.get("model_config", {}), config.model,
                                    f"export {export_dir}")
    path = pathlib.Path(source)
    if path.name.isdigit():  # a step dir, as manifests record it
      step = int(path.name) if step is None else step
      path = path.parent
    searcher.model, searcher.params, _ = restore.load_model_and_params(config, path, step=step)
    searcher._check_model()
    return searcher

  # ---------------------------------------------------------------- setup
  def _load_listings(self) -> None:
    self.meta = export_lib.load_listings(self.dir, self.manifest["processes"])
    if self.delta is not None:
      self.meta = {c: np.concatenate([self.meta[c], self.delta["meta"][c]]) for c in self.meta}
    if self.meta["listing_id"].tolist() != self.ids.tolist():
      raise DataError(f"{self.dir}: listings file does not match the id shards")

  def _check_model(self) -> None:
    if self.config is None:
      raise ConfigError("model", "a Searcher with a model needs the run config too")
    saved = self.manifest.get("model_config_hash")
    if saved and saved != restore.config_hash(self.config.model):
      restore.check_same_model_config(self.manifest.get("model_config", {}), self.config.model,
                                      f"export {self.dir}")
    if self.config.model.embed_dim != self.dim:
      raise DataError(f"the model embeds in {self.config.model.embed_dim} dimensions but the "
                      f"index at {self.dir} holds {self.dim}-dimensional vectors")
    if self.tokenizer is None:
      if not self.manifest.get("tokenizer"):
        raise DataError(f"the export at {self.dir} has no tokenizer; pass tokenizer=")
      integrity.verify(self.dir, self.assets, [self.manifest["tokenizer"]])
      self.tokenizer = Tokenizer.load(self.dir / self.manifest["tokenizer"])

  def _modality(self, m: str) -> str:
    if m not in self.modalities:
      raise DataError(f"the export at {self.dir} has no {m!r} index (it was built for "
                      f"{self.modalities}); re-export with eval.export.modalities including {m}")
    return m

  def index(self, m: str):
    """The modality's index: the base's, merged with the delta's rows after an update."""
    m = self._modality(m)
    if m not in self._indexes:
      entry = self.manifest["index"].get(m)
      if not entry:
        raise DataError(f"the export at {self.dir} has no built {m!r} index (export.build_indexes)")
      integrity.verify(self.dir, self.assets, [entry["dir"]])
      base = index_lib.load_index(self.dir / entry["dir"])
      if self.delta is not None:
        vectors = np.asarray(self.delta[f"emb_{m}"], np.float32)
        delta = index_lib.ExactIndex(vectors, 256, 4096) if len(vectors) else None
        base = index_lib.LiveIndex(base, delta, self.delta["retired"])
      self._indexes[m] = base
    return self._indexes[m]

  def vectors(self, m: str) -> np.ndarray:
    m = self._modality(m)
    if m not in self._vectors:
      integrity.verify(self.dir, self.assets, self.manifest["shards"][f"emb_{m}"])
      base = export_lib.load_shards(self.dir, f"emb_{m}", self.manifest["processes"])
      self._vectors[m] = base if self.delta is None else np.concatenate(
          [base, self.delta[f"emb_{m}"]])
    return self._vectors[m]

  # ---------------------------------------------------------------- queries
  def _hit(self, row: int, score: float) -> Hit:
    return Hit(str(self.ids[row]), float(score), str(self.meta["title"][row]),
               str(self.meta["supplier_id"][row]), str(self.meta["category"][row]),
               str(self.meta["image"][row]))

  def search_vector(self, query: np.ndarray, gallery: str = "m", k: int = 20, *,
                    exclude_rows: Sequence[int] = (), exclude_supplier: str | None = None,
                    category: str | None = None) -> list[Hit]:
    """Top-k hits for one query vector after filters (see module doc)."""
    idx = self.index(gallery)
    query = _one_query(query, idx.dim, gallery, k)
    exclude = set(int(r) for r in exclude_rows)
    fetch = min(idx.size, k + len(exclude))
    while True:
      ids, scores = idx.search(query, max(fetch, 1))
      hits = []
      for row, score in zip(ids[0], scores[0]):
        if row < 0 or row in exclude or self.retired[row]:
          continue
        if exclude_supplier is not None and self.meta["supplier_id"][row] == exclude_supplier:
          continue
        if category is not None and self.meta["category"][row] != category:
          continue
        hits.append(self._hit(row, score))
      if len(hits) >= k or fetch >= idx.size:
        return hits[:k]
      fetch = min(idx.size, fetch * 4)

  def lexical(self) -> lexical_lib.LexicalScorer:
    """Title TF-IDF over every row of the export (built on first use)."""
    if self._lexical is None:
      self._lexical = lexical_lib.LexicalScorer([str(t) for t in self.meta["title"]])
    return self._lexical

  def search_hybrid(self, query: np.ndarray, title: str, gallery: str = "m", k: int = 20, *,
                    exclude_rows: Sequence[int] = (), exclude_supplier: str | None = None,
                    category: str | None = None) -> list[Hit]:
    """Top-k by dense + title TF-IDF fused over a pooled candidate set (module doc)."""
    if self.config is None:
      raise ConfigError("eval.hybrid", "hybrid search reads eval.hybrid.*: give the Searcher a config")
    if gallery not in ("t", "m"):
      raise DataError(f"hybrid search fuses title scores into a 't' or 'm' gallery, not {gallery!r}")
    h = self.config.eval.hybrid
    idx = self.index(gallery)
    query = _one_query(query, idx.dim, gallery, k)
    exclude = set(int(r) for r in exclude_rows)
    vectors = self.vectors(gallery)
    scorer = self.lexical()
    total = min(idx.size, scorer.size)
    depth = min(total, max(h.candidates, k + len(exclude)))
    while True:
      dense_ids, _ = idx.search(query, max(depth, 1))
      lex_ids, _ = scorer.top_k([title], max(depth, 1))
      pool = [int(r) for r in dict.fromkeys(list(dense_ids[0]) + list(lex_ids[0]))
              if r >= 0 and int(r) not in exclude and not self.retired[r]
              and (exclude_supplier is None or self.meta["supplier_id"][r] != exclude_supplier)
              and (category is None or self.meta["category"][r] == category)]
      hits = []
      if pool:
        rows = np.asarray(pool, np.int64)
        dense = np.asarray(vectors[rows], np.float32) @ query[0]
        lex = scorer.scores_at([title], rows[None])[0]
        fused = fusion.fuse(h.method, dense[None], lex[None], weight=h.weight, rrf_k=h.rrf_k)[0]
        order = np.argsort(-fused, kind="stable")[:k]
        hits = [self._hit(int(rows[i]), float(fused[i])) for i in order]
      if len(hits) >= k or depth >= total:
        return hits
      depth = min(total, depth * 4)

  def row(self, listing_id: str) -> int:
    if listing_id not in self.row_of:
      raise DataError(f"unknown listing id {listing_id!r}: not in the export at {self.dir} "
                      f"({len(self.ids)} listings)")
    return self.row_of[listing_id]

  def by_id(self, listing_id: str, k: int = 20, gallery: str = "m", query: str | None = None,
            more_suppliers: bool = False, category: str | None = None,
            hybrid: bool = False) -> list[Hit]:
    """Neighbours of a listing's stored embedding (query modality defaults to `gallery`);
    with `hybrid`, fused with its title's TF-IDF scores."""
    r = self.row(listing_id)
    q = np.asarray(self.vectors(query or gallery)[r], np.float32)
    supplier = str(self.meta["supplier_id"][r]) if more_suppliers else None
    if more_suppliers and not supplier:
      raise DataError(f"listing {listing_id!r} has no supplier_id; 'more suppliers' needs one")
    if hybrid:
      return self.search_hybrid(q, str(self.meta["title"][r]), gallery, k, exclude_rows=[r],
                                exclude_supplier=supplier, category=category)
    return self.search_vector(q, gallery, k, exclude_rows=[r], exclude_supplier=supplier,
                              category=category)

  def embed_query(self, image=None, text: str | None = None) -> np.ndarray:
    """The query embedding: i (image), t (text) or m (both) from the model."""
    if self.model is None:
      raise DataError("image/text queries need the model: Searcher.open(export_dir, config=...) "
                      "or Searcher(export_dir, model=..., params=..., config=...)")
    if text is not None and not str(text).strip():
      raise DataError("empty query text: give some words (or search by image alone)")
    if image is None and text is None:
      raise DataError("give an image, a text, or both")
    modality = "m" if image is not None and text is not None else ("i" if image is not None else "t")
    if modality not in self.model.available:
      raise DataError(f"this model cannot embed {modality!r} queries (it has {self.model.available})")
    side = self.tokenizer.encode_batch([text or ""], self.config.model.tokenizer.max_len)
    side = {k: np.asarray(v) for k, v in side.items()}
    if self.config.model.image.enabled:
      size = self.config.model.image.size
      side["image"] = (_load_image(image, size, self.config.data.pipeline.resize_mode)[None]
                       if image is not None else np.zeros((1, size, size, 3), np.uint8))
    fn = embed_lib.make_embed_fn(self.model, (modality,))
    return np.asarray(fn(self.params, side)[modality])[0]

  def by_image(self, image, k: int = 20, gallery: str = "m", **filters) -> list[Hit]:
    return self.search_vector(self.embed_query(image=image), gallery, k, **filters)

  def by_text(self, text: str, k: int = 20, gallery: str = "m", hybrid: bool = False,
              **filters) -> list[Hit]:
    if hybrid:
      return self.search_hybrid(self.embed_query(text=text), text, gallery, k, **filters)
    return self.search_vector(self.embed_query(text=text), gallery, k, **filters)

  def by_image_text(self, image, text: str, k: int = 20, gallery: str = "m", **filters) -> list[Hit]:
    """Interactive search: the fused embedding of a photo and modifier words."""
    return self.search_vector(self.embed_query(image=image, text=text), gallery, k, **filters)

  def duplicates(self, supplier_id: str, threshold: float = 0.95, modality: str = "m",
                 max_neighbours: int = 100) -> list[tuple[Hit, Hit, float]]:
    """Pairs of one supplier's listings with similarity >= threshold, most similar first."""
    rows = np.nonzero((self.meta["supplier_id"] == supplier_id) & ~self.retired)[0]
    if len(rows) == 0:
      raise DataError(f"unknown supplier {supplier_id!r}: no listing of it in {self.dir}")
    vectors = np.asarray(self.vectors(modality)[rows], np.float32)
    exact = index_lib.ExactIndex(vectors, query_chunk=256, gallery_chunk=4096)
    ids, scores = exact.search(vectors, min(len(rows), max_neighbours))
    pairs = {}
    for a in range(len(rows)):
      for b, s in zip(ids[a], scores[a]):
        if b > a and s >= threshold:
          pairs[(a, int(b))] = float(s)
    ordered = sorted(pairs.items(), key=lambda kv: -kv[1])
    return [(self._hit(rows[a], s), self._hit(rows[b], s), s) for (a, b), s in ordered]

  def image_uri(self, hit: Hit, image_dir=None) -> str:
    if not hit.image:
      return ""
    if "://" in hit.image:
      return hit.image
    path = pathlib.Path(hit.image)
    if not path.is_absolute() and image_dir is not None:
      path = pathlib.Path(image_dir) / path
    return path.absolute().as_uri()

  def write_html(self, path, title: str, hits: Sequence[Hit], *, query_image=None,
                 query_text: str = "", image_dir=None) -> pathlib.Path:
    """A page with the query and the top-k hits as image cards."""
    thumb = self.config.eval.search.html_thumb_px if self.config is not None else 160
    query = ""
    if query_image is not None:
      query += f'<img src="{html.escape(pathlib.Path(query_image).absolute().as_uri())}">'
    if query_text:
      query += f" <b>{html.escape(query_text)}</b>"
    cards = [dict(dataclasses.asdict(h), image_uri=self.image_uri(h, image_dir),
                  category=h.category) for h in hits]
    return report_lib.atomic_write(path, report_lib.search_html(title, query or title, cards, thumb))


def _load_image(image, size: int, resize_mode: str) -> np.ndarray:
  """A query image (path or bytes) as uint8 [size, size, 3], or a DataError naming it.
  Read and checked as the build reads images: a regular file only, within the byte and
  pixel caps (a FIFO or /dev/zero would otherwise hang or fill memory)."""
  name = "<bytes>" if isinstance(image, (bytes, bytearray)) else str(image)
  try:
    if isinstance(image, (bytes, bytearray)):
      if len(image) > images.MAX_IMAGE_BYTES:
        raise images.BadImage("image_too_large", f"{len(image):,} bytes > "
                              f"{images.MAX_IMAGE_BYTES:,} (images.MAX_IMAGE_BYTES)")
      data = bytes(image)
    else:
      data = images.read_regular_file(image)
    img = images.to_rgb(images.open_fully(data, name))
    return images.fit_square(img, size, resize_mode)
  except (OSError, ValueError, images.BadImage) as e:
    raise DataError(f"cannot read query image {name}: {e}") from e
  except Exception as e:  # PIL raises its own types for corrupt files
    raise DataError(f"cannot read query image {name}: {type(e).__name__}: {e}") from e


_ESCAPES = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]"            # CSI: colours, cursor moves
                      r"|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?"  # OSC: titles, hyperlinks
                      r"|\x1b[PX^_][^\x1b]*(?:\x1b\\)?"       # DCS / SOS / PM / APC strings
                      r"|\x1b.?"                               # any other escape
                      r"|[\x00-\x08\x0b-\x1f\x7f-\x9f]")        # other control characters


def printable(text: str) -> str:
  """`text` safe for a terminal: ANSI escape sequences and control characters removed
  (catalog titles are user data; an escape could rewrite or hide console output)."""
  return _ESCAPES.sub("", str(text)).replace("\n", " ").replace("\t", " ")


def format_hits(hits: Sequence[Hit]) -> str:
  lines = [f"{'#':>3}  {'score':>7}  {'listing':<14} {'supplier':<12} title"]
  for rank, h in enumerate(hits, start=1):
    lines.append(f"{rank:>3}  {h.score:7.4f}  {printable(h.listing_id):<14} "
                 f"{printable(h.supplier_id):<12} {printable(h.title)}")
  return "\n".join(lines)


def search_from_config(config, workdir, export_dir, *, listing_id: str = "", image: str = "",
                       text: str = "", supplier: str = "", more_suppliers: bool = False,
                       category: str = "", gallery: str = "m", k: int = 0, html_out: str = "",
                       image_dir: str = "", checkpoint=None) -> list:
  """`esspr-jax --mode=search`: one query (or a duplicates report with `supplier` alone)."""
  del workdir
  k = k or config.eval.search.k
  needs_model = bool(image or text)
  s = Searcher.open(export_dir, config=config if needs_model else None, checkpoint=checkpoint)
  s.config = config
  filters = {"category": category or None}
  hybrid = bool(config.eval.search.hybrid)
  if listing_id:
    hits = s.by_id(listing_id, k, gallery, more_suppliers=more_suppliers, hybrid=hybrid, **filters)
    title = f"same style as {listing_id}"
  elif image or text:
    supplier_filter = {"exclude_supplier": supplier} if (supplier and more_suppliers) else {}
    if image and text:
      hits = s.by_image_text(image, text, k, gallery, **filters, **supplier_filter)
    elif image:
      hits = s.by_image(image, k, gallery, **filters, **supplier_filter)
    else:
      hits = s.by_text(text, k, gallery, hybrid=hybrid, **filters, **supplier_filter)
    title = f"query {pathlib.Path(image).name if image else ''} {text}".strip()
  elif supplier:
    pairs = s.duplicates(supplier, config.eval.search.duplicate_threshold, gallery)
    print(f"{len(pairs)} likely duplicate pairs of supplier {printable(supplier)} "
          f"(cosine >= {config.eval.search.duplicate_threshold}):")
    for a, b, score in pairs:
      print(f"  {score:.4f}  {printable(a.listing_id)} | {printable(a.title)}  <->  "
            f"{printable(b.listing_id)} | {printable(b.title)}")
    return pairs
  else:
    raise DataError("give a listing id, an image, a text, or a supplier (duplicates report)")
  print(format_hits(hits))
  if html_out:
    path = s.write_html(html_out, title, hits, query_image=image or None, query_text=text,
                        image_dir=image_dir or None)
    print(f"wrote {path}")
  return hits

