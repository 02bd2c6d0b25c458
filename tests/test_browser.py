"""The rendered site in a real headless Chromium (Debian's /usr/bin/chromium, driven by Playwright; never
`playwright install`): pages load without console errors under the strict CSP, tokens are coloured and show their
values, importance and dendrogram re-cutting work, keyboard navigation, search and the neuron table work, hostile
tokens run nothing, and the site works from a sub-path, over file:// and on a phone-sized screen. A screenshot of a
neuron page is saved to test-artifacts/neuron.png.
"""

from __future__ import annotations

import functools
import hashlib
import json
import http.server
import re
import threading
import urllib.parse
from pathlib import Path

import numpy as np
import pytest

import render_fixtures as fx
from builder.cluster import ranked_labels
from builder.schema import read_clusters, read_examples
from builder.paths import AtlasPaths

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[1]
MODEL = "tiny-atlas"
NEURON = f"{MODEL}/L0/N0/index.html"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """A static host as GitHub Pages is one: a missing path gets the site's 404.html (status 404), when it has one."""

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def send_error(self, code, message=None, explain=None):
        page = Path(self.directory) / "404.html"
        if code != 404 or not page.is_file():
            return super().send_error(code, message, explain)
        body = page.read_bytes()
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


def serve(directory: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler,
                                                                                 directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The synthetic site at www/sub/path/atlas, served at the root of one server and below /sub/path/ of another."""
    folder = tmp_path_factory.mktemp("browser")
    cfg = fx.build_site(folder, site_dir=str(folder / "www" / "sub" / "path" / "atlas"))
    root_server, root_url = serve(Path(cfg.site_dir))
    sub_server, sub_url = serve(folder / "www")
    yield {"cfg": cfg, "dir": Path(cfg.site_dir), "url": root_url, "sub": sub_url + "sub/path/atlas/"}
    root_server.shutdown()
    sub_server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail("Chromium is missing: run `make browser` (apt-get install chromium); never `playwright install`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield chromium
        chromium.close()


class Tab:
    """A fresh page that records console errors, uncaught exceptions and dialogs."""

    def __init__(self, browser, **options):
        self.context = browser.new_context(**options)
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._dialog)

    def _dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def open(self, url: str):
        self.page.goto(url)
        self.page.wait_for_selector("html[data-ready=true]", timeout=10_000)
        return self.page

    def close(self):
        self.context.close()


@pytest.fixture
def tab(browser):
    opened = Tab(browser)
    yield opened
    opened.close()


def alpha(colour: str) -> float:
    """Opacity of a computed CSS colour ('rgb(…)' is opaque, 'rgba(…, a)' has alpha a)."""
    numbers = [float(x) for x in re.findall(r"[\d.]+", colour)]
    return numbers[3] if colour.startswith("rgba") else 1.0


def token_colours(page, selector: str = ".example") -> list[str]:
    return page.eval_on_selector(selector, "card => [...card.querySelectorAll('.tok')].map("
                                           "t => getComputedStyle(t).backgroundColor)")


def test_a_neuron_page_loads_without_console_errors(site, tab):
    page = tab.open(site["url"] + NEURON)
    assert page.locator(".example").count() == 8  # every example of the neuron, central ones first
    assert page.locator("#dendro svg .leaf").count() == 8
    assert page.locator("#hist svg .bar").count() > 10
    assert page.locator("section.feature .similar details").count() == len(page.locator("section.feature").all())
    assert tab.errors == []


def test_high_activation_tokens_get_a_visibly_different_background(site, tab):
    page = tab.open(site["url"] + NEURON)
    styles = page.eval_on_selector(".example", """card => [...card.querySelectorAll('.tok')].map(t => ({
        max: t.classList.contains('max'), act: t._act, bg: getComputedStyle(t).backgroundColor}))""")
    top = next(s for s in styles if s["max"])
    low = min(styles, key=lambda s: abs(s["act"]))
    assert top["bg"] != low["bg"]
    assert alpha(top["bg"]) > 0.75 and alpha(low["bg"]) < 0.25


def test_the_importance_toggle_changes_token_colours(site, tab):
    page = tab.open(site["url"] + NEURON)
    before = token_colours(page)
    toggle = page.locator(".example .imp-toggle").first
    toggle.click()
    assert toggle.get_attribute("aria-pressed") == "true"
    after = token_colours(page)
    assert after != before
    assert any("0, 160, 90" in colour for colour in after)  # the importance (green) scale
    toggle.click()
    assert token_colours(page) == before
    page.click("#imp-all")
    assert all(t.get_attribute("aria-pressed") == "true" for t in page.locator(".imp-toggle").all())


def test_tokens_show_their_value_on_focus_and_arrows_move_between_them(site, tab):
    page = tab.open(site["url"] + NEURON)
    first = page.locator(".example .tok.max").first
    assert first.get_attribute("tabindex") == "0"
    first.focus()
    tip = page.locator("#atlas-tip")
    assert tip.is_visible() and "activation" in tip.text_content() and "offset 0" in tip.text_content()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("document.activeElement._offset") == 1
    assert "offset +1" in tip.text_content()
    page.locator(".example .tok").first.hover()
    assert tip.is_visible()


def test_keyboard_shortcuts_move_between_neurons_and_focus_search(site, tab):
    page = tab.open(site["url"] + NEURON)
    page.keyboard.press("j")
    page.wait_for_url("**/L0/N1/index.html")
    page.keyboard.press("k")
    page.wait_for_url("**/L0/N0/index.html")
    page.keyboard.press("n")
    page.wait_for_url("**/L0/N1/index.html")
    page.keyboard.press("p")
    page.wait_for_url("**/L0/N0/index.html")
    page.wait_for_selector("html[data-ready=true]")
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "q"
    page.keyboard.type("j")  # typing in the search box is not a shortcut
    assert page.url.endswith("/L0/N0/index.html")
    page.keyboard.press("Escape")
    page.keyboard.press("r")
    page.wait_for_url(re.compile(r".*/tiny-atlas/L[02]/N[0-4]/index\.html$"))
    assert tab.errors == []


def test_hostile_tokens_fire_no_dialog_and_show_their_text_literally(site, tab):
    page = tab.open(site["url"] + NEURON)
    texts = page.eval_on_selector_all(".tok", "tokens => tokens.map(t => t.textContent)")
    for hostile in ("</script><script>alert(1)</script>", "\"><img src=x onerror=alert(1)>", "{{7*7}}", "&amp;",
                    "\u202eevil\u202c", "zero\u200bwidth\u200d", "lone\ufffdsurrogate"):
        assert hostile in texts, hostile
    for locator in page.locator(".tok").all()[:60]:
        locator.hover()  # the tooltip shows each token too
    page.locator("#q").fill("<img src=x onerror=alert(1)>")
    page.locator("#q").press("Enter")
    page.wait_for_url("**/tiny-atlas/index.html#q=*")
    page.wait_for_selector("#results p")
    assert "<img src=x onerror=alert(1)>" in page.text_content("#results")
    page.wait_for_timeout(300)
    assert page.locator("img").count() == 0
    assert tab.dialogs == [] and tab.errors == []


def colours(page, selector: str) -> list[str]:
    """The colour class (c0-c7, cx) of each element matching `selector`."""
    return page.eval_on_selector_all(selector, "ns => ns.map(n => [...n.classList].find(c => /^c(\\d+|x)$/.test(c)) "
                                               "|| '')")


def recut_groups(page) -> dict[int, list[int]]:
    """Cluster id -> example indices of the regrouped feature list (every example shown, folded groups opened)."""
    page.evaluate("document.querySelectorAll('#features-recut details').forEach(d => d.open = true);"
                  "document.querySelectorAll('#features-recut button.more').forEach(b => b.click())")
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll('#features-recut section.feature')]
        .map(s => [s.dataset.cluster, [...s.querySelectorAll('.example')].map(e => +e.dataset.index)]))""")


def test_dragging_the_threshold_recuts_the_dendrogram_like_scipy(site, tab):
    from scipy.cluster.hierarchy import fcluster

    page = tab.open(site["url"] + NEURON)
    clusters = read_clusters(AtlasPaths.of(site["cfg"]), f"L{0}")
    tree = clusters["linkage"][clusters["linkage_offsets"][0]:clusters["linkage_offsets"][1]]
    for t in (0.05, 0.2, 0.35, 0.5, 0.8, 1.1, 1.6):
        expected = ranked_labels(fcluster(tree, t=t, criterion="distance"))
        found = page.evaluate("t => Array.from(Atlas.fcluster(Atlas.neuron.children, Atlas.neuron.distance, "
                              "Atlas.neuron.n, t))", t)
        assert found == expected.tolist(), t
    leaves = lambda: colours(page, "#dendro .leaf")  # noqa: E731
    assert len(set(leaves())) == 2 and page.text_content("#cut-k").startswith("2 clusters")
    page.locator("#cut").fill("0.01")
    assert page.text_content("#cut-k").startswith("8 clusters") and len(set(leaves())) == 8
    assert page.text_content("#cut-out") == "0.01"
    page.locator("#cut").fill("2")
    assert page.text_content("#cut-k").startswith("1 cluster") and len(set(leaves())) == 1
    assert len(set(colours(page, "#features-recut .example"))) == 1


def test_a_recut_regroups_the_feature_list_like_fcluster_with_recomputed_centrals(site, tab):
    from scipy.cluster.hierarchy import cophenet, fcluster
    from scipy.spatial.distance import squareform

    clusters = read_clusters(AtlasPaths.of(site["cfg"]), "L0")
    tree = clusters["linkage"][clusters["linkage_offsets"][0]:clusters["linkage_offsets"][1]]
    square = squareform(cophenet(tree))
    page = tab.open(site["url"] + NEURON)
    for t in (0.3, 1.2):
        page.locator("#cut").fill(str(t))
        labels = ranked_labels(fcluster(tree, t=t, criterion="distance"))
        expected = {k: np.flatnonzero(labels == k).tolist() for k in range(labels.max() + 1)}
        groups = recut_groups(page)
        assert {int(k): sorted(v) for k, v in groups.items()} == expected, t
        assert page.locator("#features-static").is_hidden() and page.locator("#contents-static").is_hidden()
        assert page.url.endswith(f"#cut={t}")
        for k, members in expected.items():
            # Literal reference: the member with the least summed cophenetic distance to the others, first on ties.
            sums = [square[i, members].sum() for i in members]
            assert groups[str(k)][0] == members[int(np.argmin(sums))], (t, k)
            colour = colours(page, f"#features-recut section#C{k}")[0]
            assert colour == (f"c{k}" if k < 8 else "cx")
            assert set(colours(page, f"#features-recut section#C{k} .example")) == {colour}
        rows = page.locator("#contents-recut tbody tr").count()
        singles = sum(1 for m in expected.values() if len(m) == 1)
        assert rows == sum(1 for m in expected.values() if len(m) > 1) + (1 if singles else 0)
    page.click("#cut-reset")
    assert page.locator("#features-static").is_visible() and "#cut" not in page.url
    assert tab.errors == []


def test_the_cut_lives_in_the_url_so_a_recut_view_can_be_shared(site, tab):
    page = tab.open(site["url"] + NEURON + "#cut=1.2")
    assert page.input_value("#cut") == "1.2" and page.text_content("#cut-out") == "1.2"
    assert page.locator("#features-recut").is_visible() and page.locator("#features-static").is_hidden()
    assert "re-cut" in page.text_content("#cut-k")
    page.locator("#cut").fill("0.3")
    assert page.url.endswith("#cut=0.3")
    page.reload()
    page.wait_for_selector("html[data-ready=true]")
    assert page.input_value("#cut") == "0.3"
    assert tab.errors == []


def test_dendrogram_leaves_and_examples_point_at_each_other(site, tab):
    page = tab.open(site["url"] + NEURON)
    last = page.locator("#dendro circle.leaf").nth(7)
    index = last.get_attribute("data-index")
    last.click()
    card = page.locator(f'#features-static .example[data-index="{index}"]')
    assert "hl" in card.get_attribute("class") and card.is_visible()
    page.locator('#features-static .example[data-index="0"]').hover()
    assert "hl" in page.locator('#dendro circle.leaf[data-index="0"]').get_attribute("class")
    labels = page.eval_on_selector_all("#dendro text.label", "ts => ts.map(t => t.textContent)")
    assert "cut 0.5" in labels and all(t in labels for t in ("0", "0.5", "1"))
    assert tab.errors == []


def test_histogram_has_round_ticks_a_labelled_log_scale_and_reads_bins_on_focus(site, tab):
    page = tab.open(site["url"] + NEURON)
    labels = page.eval_on_selector_all("#hist text", "ts => ts.map(t => t.textContent)")
    assert "tokens (log scale)" in labels and "0" in labels and "10" in labels
    ticks = [float(t) for t in labels if re.fullmatch(r"-?\d+(\.\d+)?", t)]
    assert ticks and all(abs(v * 10 - round(v * 10)) < 1e-9 for v in ticks)
    marker = page.locator("#hist .marker-label").bounding_box()
    for bar in page.locator("#hist rect.bar").all():
        box = bar.bounding_box()
        if box and box["height"] > 0:
            assert marker["y"] + marker["height"] <= box["y"] + 0.5  # the threshold label sits above every bar
    page.focus("#hist svg")
    page.keyboard.press("ArrowRight")
    assert re.match(r"Bin \(.+, .+\]: \d+ tokens?", page.text_content("#hist-readout"))
    assert tab.errors == []


def test_logit_tokens_are_drawn_as_literal_text(site, tab):
    page = tab.open(site["url"] + f"{MODEL}/L0/N0/index.html")
    texts = page.eval_on_selector_all("#logits code", "cs => cs.map(c => c.textContent)")
    assert len(texts) == 20
    for name in ("script", "img", "template", "entity", "rtl", "zero_width"):
        assert fx.HOSTILE[name] in texts, name
    assert "\u21b5" in texts and "lone\ufffdsurrogate" in texts  # newline visible; lone surrogate U+FFFD
    assert page.locator("#logits img, #logits script").count() == 0 and tab.dialogs == []
    assert page.eval_on_selector_all("#logits h3", "hs => hs.map(h => h.textContent)") == ["Promoted", "Suppressed"]


def test_legends_and_metric_definitions_are_on_the_neuron_page(site, tab):
    page = tab.open(site["url"] + NEURON)
    legend = page.text_content("#legend")
    assert "activation" in legend and "importance" in legend and "not scored" in legend
    for dt in page.locator("dl.metrics > div").all():
        assert len(dt.get_attribute("title") or "") > 20  # the definition, from data/common.json
        href = dt.locator("a").get_attribute("href")
        assert href.startswith("../../method/index.html#m-")
        anchor = href.split("#")[1]
        method = (site["dir"] / MODEL / "method" / "index.html").read_text()
        assert f'id="{anchor}"' in method
    assert tab.errors == []


def test_examples_can_be_ordered_by_activation_and_interval_examples_show(site, tab):
    page = tab.open(site["url"] + NEURON)
    first = lambda: page.eval_on_selector_all("#F0 .example .ex-meta",  # noqa: E731
                                              "ms => ms.map(m => +m.textContent.split(' ')[1])")
    page.select_option("#order", "activation")
    values = first()
    assert values == sorted(values, reverse=True) and len(values) > 1
    assert page.locator("#interval-list .interval").count() == site["cfg"].interval_count
    assert page.locator("#interval-list .iv-example").count() == site["cfg"].interval_count
    assert tab.errors == []


def test_a_feature_address_shows_its_section_with_examples_from_the_neuron_sidecar(site, tab):
    doc = json.loads((site["dir"] / MODEL / "L0" / "N0" / "neuron.json").read_text())
    page = tab.open(site["url"] + f"{MODEL}/L0/N0/index.html#F1")
    section = page.locator("section#F1")
    assert section.locator(".example").count() == doc["clusters"][1]["size"]
    assert section.locator(".ex-static").first.is_hidden()  # replaced by the coloured version
    assert f"{doc['clusters'][1]['size']} examples" in section.locator("h3").text_content()  # from the table
    assert section.locator(".similar details").get_attribute("open") is not None  # the named feature's list opens
    section.locator(".similar li a").first.wait_for()
    links = page.eval_on_selector_all("section#F1 .similar a", "as => as.map(a => a.getAttribute('href'))")
    assert links
    for href in links:
        assert re.fullmatch(r"(\.\./)+L\d/N\d/index\.html#F\d", href)
    assert page.url.endswith("/L0/N0/index.html#F1")  # drawing the configured cut keeps the address
    box = section.bounding_box()
    assert 0 <= box["y"] < page.viewport_size["height"]  # still in view once the examples above it are drawn
    assert tab.errors == []


def test_a_feature_reads_without_javascript(site, browser):
    plain = Tab(browser, java_script_enabled=False)
    try:
        plain.page.goto(site["url"] + f"{MODEL}/L0/N0/index.html#F1")
        section = plain.page.locator("section#F1")
        assert section.locator("h3").text_content() == "Feature F1"
        assert section.locator(".ex-static mark").count() == 1 and section.locator(".ex-static").is_visible()
        assert "Neuron Atlas: tiny-atlas layer 0 neuron 0 feature 1. tiny-atlas/L0/N0/#F1" in \
            section.locator(".cite-line").text_content()
    finally:
        plain.close()


def test_a_former_feature_address_leads_to_its_section_through_the_404_page(site, tab):
    page = tab.page
    page.goto(site["url"] + f"{MODEL}/L0/N0/F1/")
    page.wait_for_url("**/tiny-atlas/L0/N0/#F1")
    page.wait_for_selector("html[data-ready=true] body[data-kind=neuron]")
    assert page.locator("section#F1 .example").count() >= 1


def test_the_index_table_sorts_filters_and_search_finds_neurons_and_words(site, tab):
    page = tab.open(site["url"] + f"{MODEL}/index.html")
    rows = lambda: page.eval_on_selector_all("#neurons tbody tr td:first-child", "ts => ts.map(t => t.textContent)")  # noqa: E731
    assert rows()[:3] == ["L0 N0", "L0 N1", "L0 N2"] and len(rows()) == 10
    page.click("th button[data-col=n_examples]")
    counts = page.eval_on_selector_all("#neurons tbody tr td:nth-child(4)", "ts => ts.map(t => +t.textContent)")
    assert counts == sorted(counts, reverse=True) and counts[0] == 8
    assert page.get_attribute("th:has(button[data-col=n_examples])", "aria-sort") == "descending"
    page.select_option("#f-set", "L2")
    assert all(r.startswith("L2 ") for r in rows()) and len(rows()) == 5
    page.fill("#f-k", "2")
    assert 0 < len(rows()) < 5
    page.fill("#q", "2/3")
    page.press("#q", "Enter")
    page.wait_for_url("**/tiny-atlas/L2/N3/index.html")
    page.wait_for_selector("html[data-ready=true]")
    page.fill("#q", "l0 4")  # a set's slug (any case) and a unit number
    page.press("#q", "Enter")
    page.wait_for_url("**/tiny-atlas/L0/N4/index.html")
    page.wait_for_selector("html[data-ready=true]")
    page.fill("#q", "L7 N0")
    page.press("#q", "Enter")
    page.wait_for_url("**/tiny-atlas/index.html#q=*")
    page.wait_for_selector("html[data-ready=true]")
    assert "No neuron L7 N0" in page.text_content("#results")
    assert tab.errors == []


def test_the_index_keeps_sort_filters_and_page_in_the_url_and_back_restores_them(site, tab):
    page = tab.open(site["url"] + f"{MODEL}/index.html")
    page.click("th button[data-col=max_activation]")
    page.fill("#f-ex", "2")
    for _ in range(40):  # the hash is rewritten on the input event
        if "ex=2" in page.url:
            break
        page.wait_for_timeout(50)
    assert "sort=max_activation%3Adesc" in page.url and "ex=2" in page.url
    shown = page.eval_on_selector_all("#neurons tbody tr td:first-child", "ts => ts.map(t => t.textContent)")
    page.click("#neurons tbody tr a >> nth=0")
    page.wait_for_url("**/N*/index.html")
    page.go_back()
    page.wait_for_selector("html[data-ready=true]")
    assert page.input_value("#f-ex") == "2"
    assert page.get_attribute("th:has(button[data-col=max_activation])", "aria-sort") == "descending"
    assert page.eval_on_selector_all("#neurons tbody tr td:first-child", "ts => ts.map(t => t.textContent)") == shown
    assert tab.errors == []


def test_search_finds_a_multi_token_word_ranked_and_says_when_a_word_is_absent(site, tab):
    page = tab.open(site["url"] + f"{MODEL}/index.html")
    page.fill("#q", "  AHAB ")  # " Ah" + "ab": one word, matched ignoring case and spaces
    page.press("#q", "Enter")
    page.wait_for_selector("#results ol.hits li")
    first = page.locator("#results ol.hits li a").first
    assert first.get_attribute("href") == "L2/N0/index.html#F" + first.text_content().split(" F")[1]
    assert "peaks on ahab" in page.text_content("#results ol.hits li >> nth=0")
    assert "q=" in page.url
    page.fill("#q", "zeppelin")
    page.press("#q", "Enter")
    page.wait_for_selector("#results p:has-text('is not in this atlas')")
    assert tab.errors == []


def test_the_404_page_offers_search_and_the_question_mark_shows_the_keys(site, tab):
    page = tab.open(site["url"] + "404.html")
    assert "Not in this atlas" in page.text_content("h1") and page.locator("#q").count() == 1
    page.keyboard.press("?")
    assert page.locator("#keys-help").is_visible() and "j / n" in page.text_content("#keys-help")
    page.keyboard.press("Escape")
    assert page.locator("#keys-help").count() == 0
    unit = tab.open(site["url"] + f"{MODEL}/L0/N0/index.html#F1")
    unit.keyboard.press("j")
    unit.wait_for_url("**/L0/N1/index.html")
    unit.wait_for_selector("html[data-ready=true]")
    unit.keyboard.press("k")
    unit.wait_for_url("**/L0/N0/index.html")
    assert tab.errors == []


def unit_bibtex(site: dict, path: str, title: str, release: str, key_path: str | None = None) -> str:
    """The BibTeX builder.render.pages.bibtex prints for a section of the unit page `{MODEL}/L0/N0/`, citing its
    neuron.json (the sha256 hashed here) and `release`."""
    from builder.render.inputs import load_atlas
    from builder.render.pages import Cited, bibtex, resolve
    from builder.render.sidecars import provenance

    atlas = load_atlas(site["cfg"], fx.VOCAB)
    unit = f"{MODEL}/L0/N0/"
    sha = hashlib.sha256((site["dir"] / unit / "neuron.json").read_bytes()).hexdigest()
    return resolve(bibtex(atlas, provenance(atlas), path, title, Cited(f"{unit}neuron.json", sha), key_path=key_path),
                   release=release)


def test_the_bibtex_a_unit_page_writes_for_it_and_its_features_is_the_one_the_builder_would_print(site, tab):
    from builder.render.pages import feature_key_path, feature_path

    page = tab.open(site["url"] + f"{MODEL}/L0/N0/index.html#F1")
    unit = f"{MODEL}/L0/N0/"
    assert page.text_content("#cite") == unit_bibtex(site, unit, f"{MODEL} layer 0 neuron 0", "unreleased")
    for k in (0, 1):
        expected = unit_bibtex(site, feature_path(unit, k), f"{MODEL} layer 0 neuron 0 feature {k}", "unreleased",
                               key_path=feature_key_path(unit, k))
        assert page.text_content(f"section#F{k} details.bibtex pre.cite") == expected
    page.click("#reproduce > summary")
    assert "comes with a release" in page.text_content("#reproduce") and page.locator("#reproduce pre").count() == 0
    assert tab.errors == []


@pytest.fixture(scope="module")
def released_site(tmp_path_factory):
    """The synthetic site, released. Its artefacts come without stage metas, so the check that the render is up to
    date is left out: what is tested here is what a released page shows (tests/test_release.py tests the rest)."""
    from builder import release

    folder = tmp_path_factory.mktemp("released")
    cfg = fx.build_site(folder, site_url="https://example.org/atlas/", release_dir=str(folder / "releases"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(release, "check_rendered", lambda cfg: {})
        patch.setenv("SOURCE_DATE_EPOCH", "1714521600")
        made = release.release(cfg)
    server, url = serve(Path(cfg.site_dir))
    yield {"cfg": cfg, "dir": Path(cfg.site_dir), "url": url, "release": made.id}
    server.shutdown()


def test_a_released_unit_page_names_its_release_and_sha256_in_the_bibtex_and_fills_the_reproduce_script(
        released_site, tab):
    site = released_site
    page = tab.open(site["url"] + NEURON)
    expected = unit_bibtex(site, f"{MODEL}/L0/N0/", f"{MODEL} layer 0 neuron 0", site["release"])
    sha = hashlib.sha256((site["dir"] / MODEL / "L0" / "N0" / "neuron.json").read_bytes()).hexdigest()
    assert f"release {site['release']}; data {MODEL}/L0/N0/neuron.json sha256 {sha}}}" in expected
    assert page.text_content("#cite") == expected
    feature = page.text_content("section#F1 details.bibtex pre.cite")
    assert f"release {site['release']}; data" in feature
    # \url drops the backslash of \# and \%: the URL a reader follows is the feature's address, not %23F1.
    url = re.search(r"\\url\{(.*)\}\}", feature).group(1)
    assert re.sub(r"\\([#%])", r"\1", url) == f"https://example.org/atlas/{MODEL}/L0/N0/#F1" != url
    page.click("#reproduce > summary")
    page.wait_for_function("() => document.getElementById('reproduce-script').textContent.length > 0")
    # The set's template with the central example of feature F0, read here from the artefacts, and the bulk data
    # of this release beside its extracted archive (no release_url).
    paths = AtlasPaths.of(site["cfg"])
    examples = read_examples(paths, "L0")
    central = int(read_clusters(paths, "L0")["cluster_central"][0])  # unit 0 feature 0's, an index into the set
    template = json.loads((site["dir"] / MODEL / "data" / "common.json").read_text())["reproduce"]["L0"]
    script = (template.replace("__UNIT__", "0").replace("__SEQUENCE__", str(int(examples.seq[central])))
              .replace("__POSITION__", str(int(examples.pos[central])))
              .replace("__BULK__", f"{site['release']}/bulk"))
    assert page.text_content("#reproduce-script") == script
    # No release_url: the script runs beside the extracted archive, which is not on the site.
    assert (f"Run it in the folder where you extracted {site['release']}.tar.gz" in page.text_content(
        "#reproduce-where")) and "neuron-atlas package" in page.text_content("#reproduce")
    compile(script, "reproduce", "exec")
    assert page.locator("#reproduce button.copy").count() == 1
    local = tab.open((site["dir"] / NEURON).as_uri())  # over file://, releases/index.json comes from its twin
    local.click("#reproduce > summary")
    local.wait_for_function("() => document.getElementById('reproduce-script').textContent.length > 0")
    assert local.text_content("#reproduce-script") == script
    assert tab.errors == []


def test_a_first_visit_to_the_heaviest_neuron_page_transfers_under_100_kb(site, browser):
    heaviest = max((site["dir"] / MODEL).glob("L*/N*/neuron.json"), key=lambda p: p.stat().st_size).parent
    visit = Tab(browser)
    sizes = {}
    try:
        visit.page.on("response", lambda r: sizes.__setitem__(r.url, len(r.body())) if r.ok else None)
        visit.open(site["url"] + str(heaviest.relative_to(site["dir"])) + "/index.html")
        visit.page.wait_for_timeout(200)
        assert not any(url.endswith("vocab.json") for url in sizes)
        assert sum(sizes.values()) < 100_000, sizes
    finally:
        visit.close()


def test_dark_mode_follows_the_system_and_the_toggle_persists(site, browser):
    dark = Tab(browser, color_scheme="dark")
    try:
        page = dark.open(site["url"] + NEURON)
        background = lambda: page.evaluate("getComputedStyle(document.body).backgroundColor")  # noqa: E731
        assert background() == "rgb(20, 22, 25)"
        page.click("#theme")
        assert page.get_attribute("html", "data-theme") == "light" and background() == "rgb(253, 253, 252)"
        page.reload()
        page.wait_for_selector("html[data-ready=true]")
        assert page.get_attribute("html", "data-theme") == "light" and background() == "rgb(253, 253, 252)"
        page.click("#theme")
        assert background() == "rgb(20, 22, 25)"
    finally:
        dark.close()


def test_focus_is_visible_on_links_and_tokens(site, tab):
    page = tab.open(site["url"] + NEURON)
    page.keyboard.press("Tab")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline not in ("", "none")
    page.locator(".tok.max").first.focus()
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") not in ("", "none")


def test_pages_fit_a_phone_screen(site, browser):
    phone = Tab(browser, viewport={"width": 375, "height": 740}, device_scale_factor=2, is_mobile=True)
    try:
        for path in (NEURON, f"{MODEL}/index.html", f"{MODEL}/L0/N0/index.html#F1"):
            page = phone.open(site["url"] + path)
            overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 1, f"{path} is {overflow}px wider than a phone"
        assert phone.errors == []
    finally:
        phone.close()


def test_the_site_works_from_a_sub_path(site, tab):
    page = tab.open(site["sub"] + NEURON)
    assert page.locator(".example").count() == 8
    assert page.evaluate("getComputedStyle(document.querySelector('dl.metrics')).display") == "grid"  # CSS loaded
    page.click(".crumbs a:has-text('tiny-atlas')")
    page.wait_for_selector("#neurons tbody tr")
    assert "/sub/path/atlas/tiny-atlas/index.html" in page.url
    page.click("#neurons tbody tr a >> nth=1")
    page.wait_for_url("**/sub/path/atlas/tiny-atlas/L0/N1/index.html")
    assert tab.errors == []


def test_the_site_works_over_file_urls(site, tab):
    page = tab.open((site["dir"] / MODEL / "L0" / "N0" / "index.html").as_uri())
    assert page.locator(".example").count() == 8 and page.locator("#dendro svg").count() == 1
    page = tab.open((site["dir"] / MODEL / "L0" / "N0" / "index.html").as_uri() + "#F1")
    assert page.locator("section#F1 .example").count() >= 1
    page.locator("section#F1 .similar li a").first.click()  # a similar feature: a section of another unit's page
    page.wait_for_url(re.compile(r"^file:.*/L\d/N\d/index\.html#F\d$"))
    page.wait_for_selector("html[data-ready=true]")
    assert page.locator(f"#F{page.url.rsplit('#F', 1)[1]} .example").count() >= 1  # a section or a single
    page = tab.open((site["dir"] / MODEL / "index.html").as_uri())
    assert page.locator("#neurons tbody tr").count() == 10
    page.fill("#q", "ahab")
    page.press("#q", "Enter")
    page.wait_for_selector("#results ol.hits li")
    page = tab.open((site["dir"] / "index.html").as_uri())
    page.click("a.random")
    page.wait_for_url(re.compile(r".*/L\d/N\d/index\.html$"))
    assert tab.errors == []


@pytest.mark.parametrize("name, options", [
    ("neuron", {"viewport": {"width": 1200, "height": 900}}),
    ("neuron-dark", {"viewport": {"width": 1200, "height": 900}, "color_scheme": "dark"}),
    ("neuron-phone", {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True}),
])
def test_screenshots_of_a_polysemantic_neuron_page_are_saved(site, browser, name, options):
    shot = Tab(browser, **options)
    try:
        page = shot.open(site["url"] + NEURON)
        assert page.locator("#features-static section.feature").count() >= 2  # more than one feature
        target = ROOT / "test-artifacts" / f"{name}.png"
        target.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(target), full_page=True)
        assert target.stat().st_size > 20_000
        assert np.frombuffer(target.read_bytes()[:8], np.uint8).tolist() == [137, 80, 78, 71, 13, 10, 26, 10]
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= options["viewport"]["width"] + 1  # nothing forces sideways scrolling
        assert shot.errors == []
    finally:
        shot.close()


def test_the_browser_splits_and_shards_words_as_the_builder_does(site, tab):
    from builder.render.sidecars import word_shard, words_of

    page = tab.open(site["url"] + f"{MODEL}/index.html")
    for text in (" Ahab's café, naïve ÜNÏCODE 42x — ok?", "日本語のテキスト と 123", "tab\tnew\nline __init__"):
        words = page.evaluate("t => Atlas.wordsOf(t)", text)
        assert words == words_of(text), text
        for shards in (64, 4096):  # the shard count grows with the index
            assert page.evaluate("a => a[0].map(w => Atlas.wordShard(w, a[1]))", [words, shards]) == \
                [word_shard(w, shards) for w in words]
    assert tab.errors == []


@pytest.fixture(scope="module")
def sharded_site(tmp_path_factory):
    """The synthetic site rendered with budgets so small that the index shows one set at a time, the search index
    needs more than the minimum shard count and the commonest words' postings are cut: how a 7B-sized atlas is
    published (builder/scale/index.py measures that scale)."""
    from builder.render import sidecars

    folder = tmp_path_factory.mktemp("sharded")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sidecars, "TABLE_BUDGET", 1)
        patch.setattr(sidecars, "SEARCH_SHARD_BUDGET", 320)
        patch.setattr(sidecars, "SEARCH_WORD_BUDGET", 20)
        cfg = fx.build_site(folder)
    server, url = serve(Path(cfg.site_dir))
    yield {"dir": Path(cfg.site_dir), "url": url}
    server.shutdown()


def test_a_sharded_index_shows_one_set_at_a_time_and_keeps_deep_links(sharded_site, tab):
    data = sharded_site["dir"] / MODEL / "data"
    table = json.loads((data / "neurons.json").read_text())
    manifest = json.loads((data / "atlas.json").read_text())
    assert not table["all"] and manifest["search"]["shards"] > 64
    cut = {w: n for i in range(manifest["search"]["shards"])
           for w, n in json.loads((data / "search" / f"{i}.json").read_text())["cut"].items()}
    common = max(cut, key=lambda w: (cut[w], w))  # the word listed for most features, its postings cut
    rows = lambda page: page.eval_on_selector_all("#neurons tbody tr td:first-child",  # noqa: E731
                                                  "ts => ts.map(t => t.textContent)")
    for base in (sharded_site["url"] + f"{MODEL}/index.html", (sharded_site["dir"] / MODEL / "index.html").as_uri()):
        page = tab.open(base)
        page.wait_for_selector("#neurons tbody tr")
        assert page.eval_on_selector_all("#f-set option", "os => os.map(o => o.value)") == ["L0", "L2"]
        assert rows(page) == [f"L0 N{n}" for n in range(5)]
        page.click("th button[data-col=n_examples]")
        page.select_option("#f-set", "L2")
        page.wait_for_function("() => document.querySelector('#neurons tbody td').textContent.startsWith('L2')")
        counts = page.eval_on_selector_all("#neurons tbody tr td:nth-child(4)", "ts => ts.map(t => +t.textContent)")
        assert counts == sorted(counts, reverse=True) and len(counts) == 5
        assert "set=L2" in page.url and "sort=n_examples%3Adesc" in page.url
        page.goto("about:blank")  # a fresh load, not a hash change
        # A shared link restores the view and runs its search.
        page = tab.open(base + "#set=L2&sort=max_activation:desc&q=" + urllib.parse.quote(common))
        page.wait_for_selector("#results ol.hits li")
        assert page.input_value("#f-set") == "L2" and all(r.startswith("L2 ") for r in rows(page))
        assert f"is listed for {cut[common]} features" in page.text_content("#results")
        page.goto("about:blank")
        page = tab.open(base + "#set=L9")  # a set this atlas lacks falls back to the first
        page.wait_for_selector("#neurons tbody tr")
        assert page.input_value("#f-set") == "L0"
    assert tab.errors == []
