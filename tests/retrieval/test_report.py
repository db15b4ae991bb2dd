"""The HTML results page (retrieval/report.py): only web and file images reach <img src>."""
import html.parser

from esspr_jax.retrieval import report


class _Sources(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.img_src, self.scripts = [], 0

  def handle_starttag(self, tag, attrs):
    if tag == "img":
      self.img_src.append(dict(attrs).get("src"))
    self.scripts += tag == "script"


def _page(uris, title="t"):
  hits = [{"listing_id": f"L{i}", "score": 0.5, "title": title, "image_uri": u}
          for i, u in enumerate(uris)]
  parser = _Sources()
  parser.feed(report.search_html("results", "query", hits, 64))
  return parser


def test_only_http_https_and_file_images_reach_an_img_src():
  unsafe = ["javascript:alert(1)", "JaVaScRiPt:alert(1)", " javascript:alert(1)",
            "java\tscript:alert(1)", "java\nscript:alert(1)", "javascript://%0aalert(1)",
            "data:text/html;base64,PHNjcmlwdD4=", "vbscript:msgbox(1)", "blob:https://x/1"]
  safe = ["https://s.example.com/a.jpg", "http://h/b.png", "file:///data/img/c.jpg",
          "images/d.jpg"]
  page = _page(unsafe + safe)
  assert page.img_src == safe
  for uri in unsafe:
    assert report.safe_image_src(uri) is None, uri


def test_titles_cannot_inject_markup():
  page = _page(["https://h/a.jpg"], title='<script>alert(1)</script><img src="javascript:x">')
  assert page.scripts == 0 and page.img_src == ["https://h/a.jpg"]
