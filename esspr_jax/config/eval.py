"""Config section `eval`: the retrieval table, exact/ScaNN search, export and search.

Keys (see docs/retrieval.md for what each one changes):
  settings          'paper' (the paper's 7), 'all' (9), or a comma list 'i-i,m-m'
  ks                Recall@K cutoffs; the largest is the depth searched for Recall
  batch_size        rows per embed batch (the last partial batch is padded and masked)
  every_steps       the trainer runs the eval hook every N steps (0: only at the end)
  max_pairs         evaluate on the first N pairs only (0: all)
  index.*           exact chunking, the gallery size above which ScaNN is used, ScaNN
                    tree / hashing / reorder settings and its automatic tuning
  export.*          catalog export: modalities, dtype, rows per resumable chunk,
                    when an --update folds its delta into a new base
  search.*          defaults of the search command (k, duplicate threshold, HTML page;
                    `search.hybrid` fuses title TF-IDF into text and id searches)
  hybrid.*          dense + lexical (title TF-IDF) fusion: off by default; `method`
                    'weighted' (min-max normalised `weight * dense + (1 - weight) *
                    lexical`) or 'rrf' (`rrf_k`); extra rows `<x-y>+lex` for `settings`.
                    Choose `weight` on validation data of your own, never on the eval
                    set (the text recipe shows how)
"""
import ml_collections

from esspr_jax.config.checks import check, in_unit, is_number, one_of, positive_int
from esspr_jax.config.constants import MODALITIES
from esspr_jax.errors import ConfigError

PAPER_SETTINGS = ("i-i", "i-t", "i-m", "t-i", "t-t", "t-m", "m-m")
ALL_SETTINGS = tuple(f"{q}-{g}" for q in MODALITIES for g in MODALITIES)
EXPORT_DTYPES = ("float32", "float16")
HYBRID_METHODS = ("weighted", "rrf")
# Settings whose query and gallery items both carry a title.
HYBRID_SETTINGS = ("t-t", "t-m", "m-t", "m-m")

_BATCH = {"tiny": 8, "demo": 64, "base": 256, "large": 512}
_EVERY = {"tiny": 0, "demo": 0, "base": 5000, "large": 5000}


def default_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.settings = "paper"
  c.ks = (1, 5, 10, 20)
  c.batch_size = _BATCH.get(preset, 64)
  c.every_steps = _EVERY.get(preset, 0)
  c.max_pairs = 0

  c.index = ml_collections.ConfigDict()
  # Exact search: chunked matmul + running top-k; never a full Q x G score matrix.
  c.index.query_chunk = 256 if preset == "tiny" else 1024
  c.index.gallery_chunk = 1024 if preset == "tiny" else 4096
  # Galleries smaller than this use exact search (ScaNN buys nothing there).
  c.index.exact_max_gallery = 50_000
  # ScaNN returns this many neighbours for the table (MRR is truncated at this depth).
  c.index.search_depth = 100
  c.index.scann = ml_collections.ConfigDict()
  c.index.scann.num_leaves = 0                 # 0: about sqrt(N)
  c.index.scann.training_sample_size = 250_000
  c.index.scann.dims_per_block = 2
  c.index.scann.anisotropic_threshold = 0.2    # on unit vectors; <= 0 disables
  c.index.scann.target_recall = 0.99           # recall@tune_k vs exact, on a sample
  c.index.scann.tune_k = 20
  c.index.scann.tune_queries = 1000
  c.index.scann.leaves_fractions = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0)
  c.index.scann.reorder_multiples = (5, 10, 20, 40)   # reorder = multiple x tune_k
  c.index.scann.threads = 0                    # 0: all cores

  c.export = ml_collections.ConfigDict()
  c.export.modalities = "i,t,m"
  c.export.dtype = "float32"
  c.export.chunk_rows = 64 if preset == "tiny" else 4096
  # --update folds the delta into a new base (and rebuilds the indexes) once the delta
  # rows plus the retired base rows pass this fraction of the live rows.
  c.export.rebuild_fraction = 0.2

  c.search = ml_collections.ConfigDict()
  c.search.k = 20
  c.search.duplicate_threshold = 0.95
  c.search.html_thumb_px = 160
  c.search.hybrid = False       # text and id searches fuse title TF-IDF (eval.hybrid.*)

  c.hybrid = ml_collections.ConfigDict()
  c.hybrid.enabled = False      # eval: add fused rows '<x-y>+lex' for hybrid.settings
  c.hybrid.method = "weighted"  # 'weighted' | 'rrf'
  c.hybrid.weight = 0.5         # dense share of the weighted sum; choose it on validation data
  c.hybrid.rrf_k = 60
  c.hybrid.settings = "t-t,m-m"
  c.hybrid.candidates = 100     # search: dense and lexical top-N each, fused over the union
  return c


def parse_hybrid_settings(spec: str) -> tuple[str, ...]:
  out = tuple(s.strip() for s in spec.split(",") if s.strip())
  check(bool(out) and all(s in HYBRID_SETTINGS for s in out), "eval.hybrid.settings",
        f"want a comma list from {HYBRID_SETTINGS} (both sides have titles), got {spec!r}")
  return out


def parse_settings(spec: str) -> tuple[str, ...]:
  """'paper' | 'all' | 'i-i,m-m' -> a tuple of settings (query-gallery modalities)."""
  spec = spec.strip()
  if spec == "paper":
    return PAPER_SETTINGS
  if spec == "all":
    return ALL_SETTINGS
  out = tuple(s.strip() for s in spec.split(",") if s.strip())
  bad = [s for s in out if s not in ALL_SETTINGS]
  if bad or not out:
    raise ConfigError("eval.settings", f"unknown settings {bad or spec!r}; use 'paper', "
                      f"'all' or a comma list of {ALL_SETTINGS}")
  return out


def parse_modalities(spec: str, key: str) -> tuple[str, ...]:
  out = tuple(m.strip() for m in spec.split(",") if m.strip())
  bad = [m for m in out if m not in MODALITIES]
  if bad or not out or len(set(out)) != len(out):
    raise ConfigError(key, f"{spec!r}: want a comma list of distinct modalities from {MODALITIES}")
  return out


def _positive_int(c, key, name, allow_zero=False):
  positive_int(c[name], f"{key}.{name}", 0 if allow_zero else 1)


def validate(config: ml_collections.ConfigDict) -> None:
  e = config.eval
  parse_settings(e.settings)
  ks = tuple(e.ks)
  if not ks or any(not isinstance(k, int) or k < 1 for k in ks) or list(ks) != sorted(set(ks)):
    raise ConfigError("eval.ks", f"want increasing positive integers, got {ks!r}")
  for name in ("batch_size",):
    _positive_int(e, "eval", name)
  for name in ("every_steps", "max_pairs"):
    _positive_int(e, "eval", name, allow_zero=True)
  for name in ("query_chunk", "gallery_chunk", "search_depth"):
    _positive_int(e.index, "eval.index", name)
  _positive_int(e.index, "eval.index", "exact_max_gallery", allow_zero=True)
  if e.index.search_depth < max(ks):
    raise ConfigError("eval.index.search_depth",
                      f"{e.index.search_depth} is below the largest Recall@K cutoff {max(ks)}")
  s = e.index.scann
  for name in ("training_sample_size", "dims_per_block", "tune_k", "tune_queries"):
    _positive_int(s, "eval.index.scann", name)
  for name in ("num_leaves", "threads"):
    _positive_int(s, "eval.index.scann", name, allow_zero=True)
  # The threshold is a dot product with unit vectors: at 1 or above ScaNN's weight
  # T^2 / (1 - T^2) divides by zero or turns negative.
  check(is_number(s.anisotropic_threshold) and s.anisotropic_threshold < 1,
        "eval.index.scann.anisotropic_threshold",
        f"must be < 1 (<= 0 disables), got {s.anisotropic_threshold!r}")
  if not 0.0 < s.target_recall <= 1.0:
    raise ConfigError("eval.index.scann.target_recall", f"must be in (0, 1], got {s.target_recall}")
  fractions = tuple(s.leaves_fractions)
  if not fractions or any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(fractions):
    raise ConfigError("eval.index.scann.leaves_fractions",
                      f"want increasing fractions in (0, 1], got {fractions!r}")
  multiples = tuple(s.reorder_multiples)
  if not multiples or any(not isinstance(m, int) or m < 1 for m in multiples):
    raise ConfigError("eval.index.scann.reorder_multiples", f"want positive integers, got {multiples!r}")
  parse_modalities(e.export.modalities, "eval.export.modalities")
  if e.export.dtype not in EXPORT_DTYPES:
    raise ConfigError("eval.export.dtype", f"{e.export.dtype!r} not in {EXPORT_DTYPES}")
  _positive_int(e.export, "eval.export", "chunk_rows")
  fraction = e.export.rebuild_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
    raise ConfigError("eval.export.rebuild_fraction", f"must be a number in [0, 1], got {fraction!r}")
  _positive_int(e.search, "eval.search", "k")
  _positive_int(e.search, "eval.search", "html_thumb_px")
  check(isinstance(e.search.hybrid, bool), "eval.search.hybrid",
        f"must be True or False, got {e.search.hybrid!r}")
  h = e.hybrid
  check(isinstance(h.enabled, bool), "eval.hybrid.enabled", f"must be True or False, got {h.enabled!r}")
  one_of(h.method, "eval.hybrid.method", HYBRID_METHODS)
  in_unit(h.weight, "eval.hybrid.weight")
  check(is_number(h.rrf_k) and h.rrf_k > 0, "eval.hybrid.rrf_k", f"must be > 0, got {h.rrf_k!r}")
  parse_hybrid_settings(h.settings)
  _positive_int(h, "eval.hybrid", "candidates")
  if not -1.0 <= e.search.duplicate_threshold <= 1.0:
    raise ConfigError("eval.search.duplicate_threshold",
                      f"cosine threshold must be in [-1, 1], got {e.search.duplicate_threshold}")
