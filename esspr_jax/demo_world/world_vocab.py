"""The demo world's product taxonomy: industries, leaf categories, attributes, words.

Each attribute says whether the picture shows it (`visible`) and how often and how
faithfully supplier titles mention it. The world is built so that no single modality is
enough: in the "image" industries (home, apparel) titles are generic and often omit or
contradict colour/shape/pattern, which pictures always show, while a size-like attribute
lives only in the title; in the "title" industries (hardware, electronics) every style
of a category is drawn from the same stock photo, and only a coarse finish is visible.
"""
import dataclasses
import itertools


@dataclasses.dataclass(frozen=True)
class Attribute:
  name: str
  values: tuple[str, ...]
  # value -> title phrasings (synonyms); the first one is also used in queries.
  phrases: dict
  visible: bool        # drawn in the picture
  title_prob: float    # probability a supplier title mentions it
  wrong_prob: float    # probability a mention names another value (supplier error)


@dataclasses.dataclass(frozen=True)
class Category:
  industry: str
  name: str
  nouns: tuple[str, ...]
  attributes: tuple[Attribute, ...]
  renderer: str
  # Styles are spread round-robin over combinations of these attributes first, so even a
  # small world has e.g. red and blue mugs of the same shape.
  primary: tuple[str, ...]
  uses: tuple[str, ...]

  def attribute(self, name: str) -> Attribute:
    for a in self.attributes:
      if a.name == name:
        return a
    raise KeyError(f"{self.name} has no attribute {name!r}")

  @property
  def num_combinations(self) -> int:
    n = 1
    for a in self.attributes:
      n *= len(a.values)
    return n


# Colour name -> RGB used by the renderer. Red and blue come first on purpose (see primary).
COLOURS = {
    "red": (200, 30, 35), "blue": (35, 80, 200), "green": (40, 150, 60),
    "yellow": (235, 200, 40), "black": (30, 30, 32), "white": (238, 238, 232),
    "pink": (240, 140, 180), "orange": (240, 130, 30), "purple": (120, 50, 160),
}
_COLOUR_SYNONYMS = {
    "red": ("red", "crimson", "scarlet"), "blue": ("blue", "navy", "royal blue"),
    "green": ("green", "emerald", "olive green"), "yellow": ("yellow", "mustard", "lemon"),
    "black": ("black", "jet black", "ebony"), "white": ("white", "ivory", "snow white"),
    "pink": ("pink", "rose", "blush pink"), "orange": ("orange", "tangerine", "coral orange"),
    "purple": ("purple", "violet", "lavender"),
}
PATTERNS = ("plain", "stripes", "dots", "checks", "zigzag")
_PATTERN_SYNONYMS = {
    "plain": ("plain", "solid colour", "solid"), "stripes": ("striped", "stripes", "stripe"),
    "dots": ("polka dot", "dotted", "spots"), "checks": ("checked", "plaid", "gingham"),
    "zigzag": ("zigzag", "chevron", "wave pattern"),
}


def _attr(name, phrases, visible, title_prob, wrong_prob=0.0):
  return Attribute(name, tuple(phrases), dict(phrases), visible, title_prob, wrong_prob)


def _colour(title_prob=0.55, wrong_prob=0.15):
  return _attr("colour", _COLOUR_SYNONYMS, True, title_prob, wrong_prob)


def _pattern(title_prob=0.35, wrong_prob=0.1):
  return _attr("pattern", _PATTERN_SYNONYMS, True, title_prob, wrong_prob)


def _numbered(values, *formats):
  return {v: tuple(f.format(v=v) for f in formats) for v in values}


_SCREW_THREADS = ("M3", "M4", "M5", "M6", "M8", "M10", "M12")
_SCREW_LENGTHS = ("10", "12", "16", "20", "25", "30", "35", "40", "50", "60", "80")
_RESISTANCES = {
    "10R": ("10 Ohm", "10R", "10 ohms"), "47R": ("47 Ohm", "47R", "47 ohms"),
    "100R": ("100 Ohm", "100R", "100 ohms"), "220R": ("220 Ohm", "220R", "220 ohms"),
    "470R": ("470 Ohm", "470R", "470 ohms"), "1K": ("1 kOhm", "1K", "1k ohm"),
    "2K2": ("2.2 kOhm", "2K2", "2.2k ohm"), "4K7": ("4.7 kOhm", "4K7", "4.7k ohm"),
    "10K": ("10 kOhm", "10K", "10k ohm"), "22K": ("22 kOhm", "22K", "22k ohm"),
    "47K": ("47 kOhm", "47K", "47k ohm"), "100K": ("100 kOhm", "100K", "100k ohm"),
    "1M": ("1 MOhm", "1M", "1 megohm"),
}
_POWERS = {"1/8W": ("1/8 W", "0.125W", "1/8W"), "1/4W": ("1/4 W", "0.25W", "1/4W"),
           "1/2W": ("1/2 W", "0.5W", "1/2W"), "1W": ("1 W", "1W", "1 watt")}
_CAPACITANCES = ("1", "2.2", "4.7", "10", "22", "47", "100", "220", "470", "1000", "2200")
_VOLTAGES = ("6.3", "10", "16", "25", "35", "50")
_BEARINGS = ("604", "605", "606", "607", "608", "609", "623", "624", "625", "626", "627",
             "6000", "6001", "6002", "6003", "6004", "6200", "6201", "6202", "6203",
             "6204", "6205", "6300", "6301", "6302", "6303")

CATEGORIES = (
    Category(
        industry="Hardware", name="Screws & Bolts",
        nouns=("screw", "bolt", "machine screw", "hex socket bolt", "fastener"),
        attributes=(
            _attr("thread", _numbered(_SCREW_THREADS, "{v}", "{v} thread"), False, 0.97, 0.01),
            _attr("length", _numbered(_SCREW_LENGTHS, "{v} mm", "{v}mm", "L{v}mm"), False,
                  0.95, 0.01),
            _attr("finish", {"stainless": ("stainless steel", "A2 stainless", "SS304"),
                             "zinc": ("zinc plated", "galvanized", "yellow zinc"),
                             "black": ("black oxide", "black", "blackened")}, True, 0.5),
        ),
        renderer="screw", primary=("finish",),
        uses=("for furniture", "DIY", "for machinery", "metric", "pack of 100")),
    Category(
        industry="Hardware", name="Ball Bearings",
        nouns=("ball bearing", "bearing", "deep groove ball bearing", "miniature bearing"),
        attributes=(
            _attr("model", _numbered(_BEARINGS, "{v}", "{v} bearing", "type {v}"), False,
                  0.97, 0.01),
            _attr("precision", {"ABEC-1": ("ABEC-1", "P0"), "ABEC-3": ("ABEC-3", "P6"),
                                "ABEC-5": ("ABEC-5", "P5"), "ABEC-7": ("ABEC-7", "P4")},
                  False, 0.9, 0.01),
            _attr("seal", {"ZZ": ("ZZ", "metal shielded", "2Z"),
                           "2RS": ("2RS", "rubber sealed", "2RS1")}, True, 0.6),
        ),
        renderer="bearing", primary=("seal",),
        uses=("for skateboard", "for motor", "high speed", "chrome steel", "10 pcs")),
    Category(
        industry="Electronics", name="Resistors",
        nouns=("resistor", "fixed resistor", "through hole resistor", "axial resistor"),
        attributes=(
            _attr("resistance", _RESISTANCES, False, 0.97, 0.01),
            _attr("power", _POWERS, False, 0.93, 0.01),
            _attr("tolerance", {"1%": ("1%", "+-1%", "F grade"), "5%": ("5%", "+-5%", "J grade")},
                  False, 0.85, 0.01),
            _attr("body", {"carbon film": ("carbon film", "CF"),
                           "metal film": ("metal film", "MF")}, True, 0.6),
        ),
        renderer="resistor", primary=("body",),
        uses=("for arduino", "100 pcs", "electronic components", "DIY kit", "DIP")),
    Category(
        industry="Electronics", name="Electrolytic Capacitors",
        nouns=("electrolytic capacitor", "capacitor", "aluminum electrolytic capacitor",
               "radial capacitor"),
        attributes=(
            _attr("capacitance", _numbered(_CAPACITANCES, "{v}uF", "{v} uF", "{v} microfarad"),
                  False, 0.97, 0.01),
            _attr("voltage", _numbered(_VOLTAGES, "{v}V", "{v} V", "{v} volt"), False, 0.95, 0.01),
            _attr("temperature", {"85C": ("85C", "85 degC"), "105C": ("105C", "105 degC")},
                  False, 0.6, 0.01),
            _attr("sleeve", {"black": ("black sleeve", "black"), "blue": ("blue sleeve", "blue")},
                  True, 0.4),
        ),
        renderer="capacitor", primary=("sleeve",),
        uses=("radial", "low ESR", "for power supply", "50 pcs")),
    Category(
        industry="Home & Kitchen", name="Mugs",
        nouns=("mug", "coffee mug", "cup", "ceramic mug", "tea cup"),
        attributes=(
            _colour(),
            _attr("shape", {"classic": ("classic", "straight", "standard"),
                            "tall": ("tall", "latte", "tall slim"),
                            "tapered": ("tapered", "conical", "v-shaped"),
                            "barrel": ("barrel", "round belly", "bulged"),
                            "espresso": ("espresso", "small", "mini")}, True, 0.4, 0.1),
            _pattern(),
            _attr("capacity", _numbered(("250", "350", "450"), "{v} ml", "{v}ml", "{v} ML"),
                  False, 0.85, 0.02),
        ),
        renderer="mug", primary=("colour", "shape"),
        uses=("for coffee", "for tea", "gift", "office", "microwave safe", "dishwasher safe")),
    Category(
        industry="Home & Kitchen", name="Cushions",
        nouns=("cushion", "throw pillow", "pillow", "cushion cover", "sofa cushion"),
        attributes=(
            _colour(),
            _attr("shape", {"square": ("square",), "round": ("round", "circle"),
                            "lumbar": ("lumbar", "rectangular")}, True, 0.45, 0.1),
            _pattern(),
            _attr("size", _numbered(("40", "45", "50"), "{v}x{v} cm", "{v} x {v} cm",
                                    "{v}cm"), False, 0.85, 0.02),
        ),
        renderer="cushion", primary=("colour", "shape"),
        uses=("for sofa", "home decor", "living room", "soft", "bedroom")),
    Category(
        industry="Apparel", name="Dresses",
        nouns=("dress", "women dress", "summer dress", "party dress", "frock"),
        attributes=(
            _colour(),
            _attr("cut", {"a-line": ("a-line", "a line"), "bodycon": ("bodycon", "sheath"),
                          "maxi": ("maxi", "long"), "shift": ("shift", "straight"),
                          "flare": ("fit and flare", "skater")}, True, 0.4, 0.1),
            _pattern(),
            _attr("fabric", {"cotton": ("cotton",), "chiffon": ("chiffon",),
                             "linen": ("linen",), "satin": ("satin", "silky")}, False, 0.85, 0.02),
        ),
        renderer="dress", primary=("colour", "cut"),
        uses=("for women", "summer", "casual", "elegant", "2026 fashion", "party")),
    Category(
        industry="Apparel", name="T-Shirts",
        nouns=("t-shirt", "tee", "t shirt", "top", "shirt"),
        attributes=(
            _colour(),
            _attr("neck", {"crew": ("crew neck", "round neck"), "v": ("v-neck", "v neck")},
                  True, 0.45, 0.1),
            _attr("sleeve", {"short": ("short sleeve",), "long": ("long sleeve",)}, True, 0.5,
                  0.1),
            _pattern(),
            _attr("weight", _numbered(("160", "180", "220"), "{v} gsm", "{v}gsm", "{v}g"),
                  False, 0.85, 0.02),
        ),
        renderer="tshirt", primary=("colour", "neck", "sleeve"),
        uses=("for men", "unisex", "casual", "cotton", "basic", "streetwear")),
)
CATEGORY_BY_NAME = {c.name: c for c in CATEGORIES}
INDUSTRIES = tuple(dict.fromkeys(c.industry for c in CATEGORIES))

NOISE_WORDS = ("hot sale", "new arrival", "factory direct", "wholesale", "high quality",
               "2026 new", "free shipping", "OEM", "premium", "best price", "in stock",
               "top rated", "customizable", "bulk", "original")
SUPPLIER_WORDS = ("Ningbo", "Yiwu", "Shenzhen", "Everbright", "Sunrise", "Golden", "Apex",
                  "Bluewave", "Harbor", "Nova", "Summit", "Pioneer", "Zenith", "Lotus",
                  "Orchid", "Maple", "Atlas", "Vertex", "Crown", "Delta")
SUPPLIER_SUFFIXES = ("Trading", "Industrial", "Manufacturing", "Import & Export", "Supply",
                     "Co.", "Group", "Store")


def combinations(category: Category) -> list[dict]:
  """All attribute-value dicts of a category, primary attributes varying slowest."""
  names = [a.name for a in category.attributes]
  values = [a.values for a in category.attributes]
  return [dict(zip(names, combo)) for combo in itertools.product(*values)]
