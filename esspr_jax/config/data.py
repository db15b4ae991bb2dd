"""Config section `data`: the demo world generator, click-log mining, the input pipeline.

  world.*     sizes, split and noise of the built-in demo marketplace (docs/data.md)
  mining.*    the click-log pair-mining constraints, caps, bad-row policy, Beam runner
  fetch.*     downloading release-format image URLs (ingest/fetch_images.py)
  pipeline.*  owned by esspr_jax.config.pipeline (TFDS build + Grain loading)
"""
import ml_collections

from esspr_jax.config import pipeline as pipeline_section
from esspr_jax.config.checks import check as _check
from esspr_jax.config.checks import in_unit as _in_unit
from esspr_jax.config.checks import positive_int as _positive_int

# The demo world's leaf categories and how many distinct styles each can make (the product
# of its attribute value counts). esspr_jax/demo_world/world_vocab.py defines them; a test
# keeps the two equal, so the config can check sizes without importing the world.
WORLD_CATEGORY_STYLES = {
    "Screws & Bolts": 231, "Ball Bearings": 208, "Resistors": 208,
    "Electrolytic Capacitors": 264, "Mugs": 675, "Cushions": 405, "Dresses": 900,
    "T-Shirts": 540,
}

# styles, suppliers in the pool, click-log sessions, image side in pixels.
_WORLD_SIZES = {
    "tiny": (96, 16, 400, 32),
    "demo": (800, 60, 20000, 96),   # 20k sessions: ~3,400 mined pairs (10k gave ~2,000)
    "base": (1600, 120, 40000, 128),
    "large": (1600, 120, 80000, 128),
}


def world_config(preset: str) -> ml_collections.ConfigDict:
  styles, suppliers, sessions, image_size = _WORLD_SIZES.get(preset, _WORLD_SIZES["demo"])
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_styles = styles                # spread evenly over the categories
  c.categories = ""                    # comma list of leaf names; "" = all 8
  c.eval_style_fraction = 0.2          # styles held out of the click log, for eval_pairs.csv
  c.eval_pairs_per_style = 1
  c.composed_per_style = 4             # modification triplets per train style (0 = none)
  c.min_suppliers_per_style = 2
  c.max_suppliers_per_style = 6
  c.num_suppliers = suppliers          # supplier pool; each has its own title habits
  c.image_size = image_size
  c.image_format = "jpeg"              # 'jpeg' or 'png'
  c.jpeg_quality = 90
  c.num_workers = 1 if preset == "tiny" else 0   # image rendering processes; 0 = one per core
  c.watermark_prob = 0.15
  c.typo_prob = 0.12                   # per title
  c.noise_word_prob = 0.7              # per title: marketing words ("hot sale", "OEM")
  # Click log.
  c.num_sessions = sessions
  c.results_per_session = 10
  c.query_attribute_prob = 0.85        # each attribute of the wanted style named in the query
  c.short_query_prob = 0.0             # share of queries naming one attribute ("red mug")
  c.ranking_noise = 0.3                # std of the search engine's score noise
  c.noise_result_prob = 0.2            # per slot: a result from another category
  c.relevance_noise = 0.08             # std of the logged query-item relevance
  c.position_bias = 0.7                # examination prob = position ** -position_bias
  c.click_prob_wanted = 0.9            # attractiveness of the wanted style
  c.click_prob_related = 0.2           # x relevance**2 for other same-category styles
  c.click_prob_unrelated = 0.2         # results from other categories
  c.corrupt_row_fraction = 0.002 if preset in ("demo", "base", "large") else 0.0
  c.start_timestamp = 1_767_225_600    # 2026-01-01T00:00:00Z
  c.span_days = 30
  return c


def mining_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.group_by = "session"               # 'session' (one query issue) or 'query' (same text)
  c.category_constraint = True         # both listings in the same leaf category
  c.relevance_constraint = True        # both listings relevant to the query
  c.min_relevance = 0.8
  # Title agreement (the paper's optional title/attribute constraint): Jaccard overlap of
  # the two titles' lower-case word sets must reach this; 0 = off.
  c.min_title_overlap = 0.0
  c.min_coclicks = 1                   # groups in which a pair must be co-clicked
  c.max_pairs_per_query = 20           # 0 = no cap
  c.max_pairs_per_listing = 30         # 0 = no cap
  c.max_listings_per_group = 200       # most relevant clicked listings paired per query; 0 = all
  c.seed = 0                           # tie-break hashing for caps and trigger/recall sides
  c.input_format = "auto"              # 'auto' (by extension), 'csv' or 'parquet'
  c.strict = False                     # first bad row raises, naming file and row
  c.max_bad_fraction = 0.05            # stop when more of the click log than this is bad
  c.write_rejects = True               # OUT.rejects.csv: reason, file:row, detail
  c.num_shards = 0                     # output shards; 0 = the runner decides (1 shard -> OUT)
  c.runner = "DirectRunner"            # overridden by --runner=... pipeline options
  c.pipeline_options = ""              # extra Beam options, e.g. "--direct_num_workers=2"
  del preset
  return c


def fetch_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workers = 16                       # concurrent downloads
  c.per_host = 4                       # most requests in flight to one host
  c.min_host_interval_s = 0.0          # least time between request starts to one host
  c.connect_timeout_s = 5.0
  c.read_timeout_s = 10.0              # per socket read
  c.total_timeout_s = 30.0             # whole body of one attempt
  c.retries = 3                        # extra attempts for transient failures
  c.backoff_s = 0.5                    # doubled per retry
  c.max_backoff_s = 30.0               # cap, also on a server's Retry-After
  c.max_bytes = 20 * 1024 * 1024       # larger bodies fail as too_large
  c.max_side = 512                     # stored long side in pixels; 0 = keep
  c.min_side = 8                       # smaller images fail as too_small
  c.jpeg_quality = 90
  c.user_agent = "esspr-jax-fetch-images/0.1"
  # URL lists come from third parties: hosts (and redirect targets) resolving to loopback,
  # link-local, private or other non-public addresses are refused unless this is True
  # (an internal mirror, or a test server on 127.0.0.1).
  c.allow_private_hosts = False
  del preset
  return c


def default_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.world = world_config(preset)
  c.mining = mining_config(preset)
  c.fetch = fetch_config(preset)
  c.pipeline = pipeline_section.default_config(preset)
  return c


def validate_world(w, prefix: str = "data.world") -> None:
  names = [n.strip() for n in w.categories.split(",") if n.strip()]
  unknown = [n for n in names if n not in WORLD_CATEGORY_STYLES]
  _check(not unknown, f"{prefix}.categories",
         f"unknown {unknown}; known: {list(WORLD_CATEGORY_STYLES)}")
  cats = names or list(WORLD_CATEGORY_STYLES)
  _positive_int(w.num_styles, f"{prefix}.num_styles", 2 * len(cats))
  fewest = min(cats, key=WORLD_CATEGORY_STYLES.get)
  per_cat = -(-w.num_styles // len(cats))
  _check(per_cat <= WORLD_CATEGORY_STYLES[fewest], f"{prefix}.num_styles",
         f"{w.num_styles} styles need {per_cat} per category but {fewest!r} has only "
         f"{WORLD_CATEGORY_STYLES[fewest]} distinct styles")
  _check(0 < w.eval_style_fraction < 1, f"{prefix}.eval_style_fraction",
         f"must be in (0, 1), got {w.eval_style_fraction!r}")
  _positive_int(w.eval_pairs_per_style, f"{prefix}.eval_pairs_per_style")
  _positive_int(w.get("composed_per_style", 0), f"{prefix}.composed_per_style", 0)
  _positive_int(w.min_suppliers_per_style, f"{prefix}.min_suppliers_per_style", 2)
  _positive_int(w.max_suppliers_per_style, f"{prefix}.max_suppliers_per_style",
                w.min_suppliers_per_style)
  _positive_int(w.num_suppliers, f"{prefix}.num_suppliers", w.max_suppliers_per_style)
  _positive_int(w.image_size, f"{prefix}.image_size", 16)
  _positive_int(w.num_workers, f"{prefix}.num_workers", 0)
  _check(w.image_format in ("jpeg", "png"), f"{prefix}.image_format",
         f"must be 'jpeg' or 'png', got {w.image_format!r}")
  _positive_int(w.jpeg_quality, f"{prefix}.jpeg_quality")
  _check(w.jpeg_quality <= 100, f"{prefix}.jpeg_quality", "must be <= 100")
  for key in ("watermark_prob", "typo_prob", "noise_word_prob", "query_attribute_prob",
              "short_query_prob", "noise_result_prob", "click_prob_wanted", "click_prob_related",
              "click_prob_unrelated", "corrupt_row_fraction"):
    _in_unit(w[key], f"{prefix}.{key}")
  _positive_int(w.num_sessions, f"{prefix}.num_sessions")
  _positive_int(w.results_per_session, f"{prefix}.results_per_session", 2)
  for key in ("ranking_noise", "relevance_noise", "position_bias"):
    _check(isinstance(w[key], (int, float)) and w[key] >= 0, f"{prefix}.{key}",
           f"must be >= 0, got {w[key]!r}")
  _positive_int(w.start_timestamp, f"{prefix}.start_timestamp", 0)
  _positive_int(w.span_days, f"{prefix}.span_days")


def validate_mining(m, prefix: str = "data.mining") -> None:
  _check(m.group_by in ("session", "query"), f"{prefix}.group_by",
         f"must be 'session' or 'query', got {m.group_by!r}")
  _in_unit(m.min_relevance, f"{prefix}.min_relevance")
  _in_unit(m.min_title_overlap, f"{prefix}.min_title_overlap")
  _positive_int(m.min_coclicks, f"{prefix}.min_coclicks")
  _positive_int(m.max_pairs_per_query, f"{prefix}.max_pairs_per_query", 0)
  _positive_int(m.max_pairs_per_listing, f"{prefix}.max_pairs_per_listing", 0)
  _positive_int(m.max_listings_per_group, f"{prefix}.max_listings_per_group", 0)
  _check(m.input_format in ("auto", "csv", "parquet"), f"{prefix}.input_format",
         f"must be 'auto', 'csv' or 'parquet', got {m.input_format!r}")
  _in_unit(m.max_bad_fraction, f"{prefix}.max_bad_fraction")
  _positive_int(m.num_shards, f"{prefix}.num_shards", 0)
  _check(isinstance(m.runner, str) and m.runner.strip() != "", f"{prefix}.runner",
         "must name a Beam runner, e.g. 'DirectRunner'")
  _check(isinstance(m.pipeline_options, str), f"{prefix}.pipeline_options",
         "must be a string of Beam flags")


def validate_fetch(f, prefix: str = "data.fetch") -> None:
  for key in ("workers", "per_host", "max_bytes", "min_side"):
    _positive_int(f[key], f"{prefix}.{key}")
  for key in ("retries", "max_side"):
    _positive_int(f[key], f"{prefix}.{key}", 0)
  _positive_int(f.jpeg_quality, f"{prefix}.jpeg_quality")
  _check(f.jpeg_quality <= 100, f"{prefix}.jpeg_quality", "must be <= 100")
  for key in ("connect_timeout_s", "read_timeout_s", "total_timeout_s"):
    _check(isinstance(f[key], (int, float)) and f[key] > 0, f"{prefix}.{key}",
           f"must be > 0 seconds, got {f[key]!r}")
  for key in ("min_host_interval_s", "backoff_s", "max_backoff_s"):
    _check(isinstance(f[key], (int, float)) and f[key] >= 0, f"{prefix}.{key}",
           f"must be >= 0 seconds, got {f[key]!r}")
  _check(isinstance(f.user_agent, str) and f.user_agent.strip() != "", f"{prefix}.user_agent",
         "must be a non-empty string")
  _check(isinstance(f.allow_private_hosts, bool), f"{prefix}.allow_private_hosts",
         f"must be True or False, got {f.allow_private_hosts!r}")


def validate(config: ml_collections.ConfigDict) -> None:
  validate_world(config.data.world)
  validate_mining(config.data.mining)
  validate_fetch(config.data.fetch)
  pipeline_section.validate(config)
