"""A hostile corpus runs through the whole build on the embedded model; every page shows it literally and runs
nothing (checked in headless Chromium)."""

from __future__ import annotations

import numpy as np
import pytest

from builder.config import EMBEDDED_MODEL, config_from_dict
from builder.paths import AtlasPaths
from builder.pipeline import STAGES
from builder.schema import read_examples, read_tokens
from builder.stage import run_stage
from test_browser import Tab, serve

PAYLOADS = [
    "</script><script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "{{7*7}} {% for x in y %} ${7*7} <%= 7*7 %>",
    "&amp; &lt;b&gt; &#x3C;script&#x3E;",
    "javascript:alert(1) <a href=\"javascript:alert(2)\">click</a> <svg onload=alert(3)>",
    "\u202eevil\u202c zero\u200bwidth\u200d bell\x07 escape\x1b[31m tab\tend",
    "non-BMP 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🐋🦑 ∑∫",
    "Z" * 3000,
]


@pytest.fixture(scope="module")
def hostile_site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    corpus = folder / "hostile.txt"
    lines = [f"The whale said {payload} and swam on, calling me Ishmael." for payload in PAYLOADS]
    # invalid UTF-8 bytes in the middle of a document; the reader replaces them with U+FFFD
    corpus.write_bytes(("\n".join(lines * 3)).encode() + b"\nbroken \xff\xfe bytes \xc3\x28 here, said Ahab.\n")
    cfg = config_from_dict({"model": EMBEDDED_MODEL, "data_files": [str(corpus)], "device": "cpu",
                            "context_length": 32, "layers": [0], "workers": 1, "build_date": "2024-01-01",
                            "name": "hostile", "neighbour_threshold": 0.0,
                            "out_dir": str(folder / "build"), "site_dir": str(folder / "site")})
    return cfg


@pytest.mark.slow
def test_hostile_corpus_renders_literally_and_runs_nothing(hostile_site, share_embedded_model):
    cfg = hostile_site
    for stage in STAGES:
        run_stage(stage, cfg)
    paths = AtlasPaths.of(cfg)
    tokens = read_tokens(paths)
    decode = share_embedded_model.tokenizer.decode
    hostile_rows = {s for s in range(len(tokens)) if any(c in decode(tokens[s]) for c in "<>{}&\u202e\x07")}
    examples = read_examples(paths, f"L{0}")
    neurons = [n for n in range(len(examples.offsets) - 1)
               if set(examples.seq[examples.unit_slice(n)].tolist()) & hostile_rows][:6]
    assert neurons, "no neuron has an example in a hostile sequence"

    from playwright.sync_api import sync_playwright

    from test_browser import ARGS, CHROMIUM

    server, url = serve(paths.site)
    shown = ""
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
            tab = Tab(browser)
            for neuron in neurons:
                for page_path in (f"hostile/L0/N{neuron}/index.html", f"hostile/L0/N{neuron}/index.html#F0"):
                    page = tab.open(url + page_path)
                    page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
                    shown += page.eval_on_selector_all(".tok", "ts => ts.map(t => t.textContent).join('')")
                    for locator in page.locator(".tok").all()[:40]:
                        locator.hover()
                    assert page.locator("img").count() == 0
                    assert page.locator("svg[onload], a[href^='javascript']").count() == 0
                    # every script on the page is one the site ships (src) or inert data
                    kinds = page.eval_on_selector_all("script", "ss => ss.map(s => s.src ? 'src' : s.type)")
                    assert set(kinds) <= {"src", "application/json"}, kinds
            browser.close()
    finally:
        server.shutdown()
    assert tab.dialogs == [] and tab.errors == []
    assert any(fragment in shown for fragment in ("<script", "<img", "{{", "&amp;", "onerror", "<svg")), shown[:500]
    # text that is not valid UTF-8 or is a control character never breaks a page: the sidecars are valid UTF-8 JSON
    sidecars = list((paths.site / "hostile" / "L0").rglob("neuron.json"))
    assert len(sidecars) == len(examples.offsets) - 1
    for sidecar in sidecars:
        sidecar.read_bytes().decode("utf-8")
    assert np.isfinite(read_examples(paths, f"L{0}").act).all()
