/* Neuron Atlas: the model index page's script, after atlas.js (whose helpers it uses): the sortable, filterable
 * table of every unit with its state in the URL, and the word search over data/search/{i}.json. Kept apart so
 * neuron pages, the heaviest first visits, do not download it. Safety as in atlas.js: text only via textContent.
 */
(function () {
  "use strict";

  var Atlas = window.Atlas, lib = Atlas.lib;
  var el = lib.el, fmt = lib.fmt, data = lib.data, modelRoot = lib.modelRoot, unitHref = lib.unitHref;
  var pageIndex = lib.pageIndex, SubjectIndex = lib.SubjectIndex, hashParams = lib.hashParams;
  var loadData = Atlas.loadData;

  // The model index: sortable, filterable, paged table of every neuron, its state in the URL (#sort=…&page=…), so
  // Back and a shared link restore it.
  var PAGE = 50;
  var COLUMNS = ["max_activation", "density", "n_examples", "n_clusters", "n_multi", "largest_share", "mean_distance",
                 "intra_distance", "inter_distance"];

  /* The unit table (docs/sidecar-schema.md, neurons.json): a manifest and one shard per subject set, loaded when a
   * view shows that set, so no view downloads more than the manifest's budget. Every set at once only when `all`. */
  async function initModel() {
    var tbody = document.querySelector("#neurons tbody");
    if (!tbody) return;
    var table = await loadData("neurons", "data/neurons.json");
    var index = new SubjectIndex(table.sets), total = index.total;
    var shards = new Map(table.shards.map(function (s) { return [s.set, s]; }));
    var cols = {}, loaded = new Map();  // cols[name][row] for the rows of the sets loaded so far
    var state = { col: "row", dir: 1, page: 0 };
    var filters = { set: document.getElementById("f-set"), ex: document.getElementById("f-ex"),
                    k: document.getElementById("f-k"), share: document.getElementById("f-share") };
    var every = filters.set.querySelector('option[value=""]');
    if (every && !table.all) every.remove();
    var defaults = { set: filters.set.options.length ? filters.set.options[0].value : "", ex: "0", k: "0", share: "1" };
    function shown() { return filters.set.value ? [index.byKey.get(filters.set.value)] : index.sets; }
    function loadSet(set) {
      if (!loaded.has(set.key)) {
        loaded.set(set.key, loadData("neurons-" + set.key, "data/" + shards.get(set.key).file).then(function (doc) {
          return Promise.all(Object.keys(doc.columns).map(async function (name) {
            var field = doc.columns[name];
            var values = field.dtype === "json" ? await Atlas.unpackJson(doc, field.data) :
              await Atlas.unpack(doc, field.data, field.dtype);
            var column = cols[name] || (cols[name] = []);
            for (var u = 0; u < set.size; u++) column[set.offset + u] = Number.isNaN(values[u]) ? null : values[u];
          }));
        }));
      }
      return loaded.get(set.key);
    }
    function value(row, col) { return col === "row" ? row : cols[col][row]; }
    function rows() {
      var minEx = Number(filters.ex.value) || 0, minK = Number(filters.k.value) || 0;
      var maxShare = filters.share.value === "" ? 1 : Number(filters.share.value);
      var out = [];
      shown().forEach(function (set) {
        for (var r = set.offset; r < set.offset + set.size; r++) {
          if (cols.n_examples[r] < minEx || cols.n_clusters[r] < minK) continue;
          if (cols.n_examples[r] === 0 && set.kind === "sae") continue;  // inactive latents: no page
          var share = cols.largest_share[r];
          if (share !== null && share > maxShare + 1e-12) continue;
          out.push(r);
        }
      });
      out.sort(function (a, b) {
        var x = value(a, state.col), y = value(b, state.col);
        if (x === null && y === null) return a - b;
        if (x === null) return 1;  // missing values last in either direction
        if (y === null) return -1;
        return (x - y) * state.dir || a - b;
      });
      return out;
    }
    function writeState() {
      var params = new URLSearchParams();
      var query = hashParams().get("q");
      if (query) params.set("q", query);
      if (state.col !== "row" || state.dir !== 1) params.set("sort", state.col + ":" + (state.dir > 0 ? "asc" : "desc"));
      if (state.page) params.set("page", String(state.page + 1));
      Object.keys(filters).forEach(function (key) {
        if (filters[key].value !== defaults[key]) params.set(key, filters[key].value);
      });
      var hash = params.toString();
      try {
        window.history.replaceState(null, "", hash ? "#" + hash : window.location.pathname + window.location.search);
      } catch (e) { /* file:// in some browsers */ }
    }
    function readState() {
      var params = hashParams();
      var sort = (params.get("sort") || "").split(":");
      state.col = sort[0] && (sort[0] === "row" || COLUMNS.indexOf(sort[0]) >= 0) ? sort[0] : "row";
      state.dir = sort[1] === "desc" ? -1 : 1;
      state.page = Math.max(0, (Number(params.get("page")) || 1) - 1);
      Object.keys(filters).forEach(function (key) {
        filters[key].value = params.has(key) ? params.get(key) : defaults[key];
      });
      if (filters.set.selectedIndex < 0) filters.set.value = defaults.set;  // a set this atlas lacks, or "all"
      document.querySelectorAll("#neurons th").forEach(function (th) {
        var button = th.querySelector("button");
        th.setAttribute("aria-sort", button && button.dataset.col === state.col ?
          (state.dir > 0 ? "ascending" : "descending") : "none");
      });
    }
    var drawing = 0;
    function draw() {  // once the shown sets' shards are loaded; a later draw supersedes one still loading
      var ticket = ++drawing;
      return Promise.all(shown().map(loadSet)).then(function () { if (ticket === drawing) paint(); }, function (error) {
        document.getElementById("page-info").textContent = "The unit table could not be loaded (" + error.message +
          ").";
      });
    }
    function paint() {
      var list = rows();
      var pages = Math.max(1, Math.ceil(list.length / PAGE));
      state.page = Math.min(state.page, pages - 1);
      tbody.textContent = "";
      list.slice(state.page * PAGE, state.page * PAGE + PAGE).forEach(function (r) {
        var tr = el("tr");
        var at = index.unit(r);
        var td = el("td");
        td.appendChild(el("a", { href: at.set.slug + "/N" + at.unit + "/index.html" }, at.set.slug + " N" + at.unit));
        tr.appendChild(td);
        COLUMNS.forEach(function (c) {
          var v = cols[c][r];
          tr.appendChild(el("td", null, c === "n_examples" || c === "n_clusters" || c === "n_multi" ? String(v) : fmt(v, 3)));
        });
        tr.appendChild(el("td", { class: "desc" }, cols.summary ? cols.summary[r] : ""));
        tbody.appendChild(tr);
      });
      document.getElementById("page-info").textContent = "page " + (state.page + 1) + " of " + pages + " \u00b7 " +
        list.length + " of " + total + " neurons";
      document.getElementById("page-prev").disabled = state.page === 0;
      document.getElementById("page-next").disabled = state.page >= pages - 1;
      writeState();
    }
    document.querySelectorAll("#neurons th button").forEach(function (button) {
      button.addEventListener("click", function () {
        var col = button.dataset.col;
        state.dir = state.col === col ? -state.dir : (col === "row" ? 1 : -1);
        state.col = col;
        state.page = 0;
        document.querySelectorAll("#neurons th").forEach(function (th) { th.setAttribute("aria-sort", "none"); });
        button.parentNode.setAttribute("aria-sort", state.dir > 0 ? "ascending" : "descending");
        draw();
      });
    });
    Object.keys(filters).forEach(function (key) {
      filters[key].addEventListener("input", function () { state.page = 0; draw(); });
    });
    document.getElementById("page-prev").addEventListener("click", function () { state.page--; draw(); });
    document.getElementById("page-next").addEventListener("click", function () { state.page++; draw(); });
    window.addEventListener("popstate", function () { readState(); draw(); });
    readState();
    await draw();
  }

  Atlas.initModel = initModel;

  /* Words as builder.render.sidecars.words_of splits them: runs of letters/digits, or single other characters. */
  function wordsOf(text) { return (text.toLowerCase().match(/[\p{L}\p{N}_]+|[^\p{L}\p{N}_\s]/gu) || []); }
  Atlas.wordsOf = wordsOf;

  /* FNV-1a (32-bit) of the word's UTF-8 bytes, as builder.render.sidecars.word_shard. */
  function wordShard(word, shards) {
    var bytes = new TextEncoder().encode(word), h = 0x811c9dc5;
    for (var i = 0; i < bytes.length; i++) { h ^= bytes[i]; h = Math.imul(h, 0x01000193) >>> 0; }
    return h % shards;
  }
  Atlas.wordShard = wordShard;

  /* Features whose examples peak on every word of the query (or hold it near the central example's max token),
   * ranked by how many examples peak on the words, then by unit. */
  async function wordSearch(query, results) {
    results.textContent = "Searching\u2026";
    var words = Array.from(new Set(wordsOf(query))).slice(0, 8);
    var postings, cut = [];
    try {
      var manifest = await loadData("atlas", modelRoot() + "data/atlas.json");
      var shards = manifest.search.shards;
      postings = await Promise.all(words.map(function (w) {
        var shard = wordShard(w, shards);
        return loadData("search" + shard, modelRoot() + "data/search/" + shard + ".json").then(function (doc) {
          if (doc.cut && doc.cut[w]) cut.push(JSON.stringify(w) + " is listed for " + doc.cut[w] + " features; the " +
            doc.words[w].length + " with the most examples peaking on it are indexed");
          return doc.words[w] || [];
        });
      }));
    } catch (error) {
      results.textContent = "The search index could not be loaded (" + error.message + ").";
      return;
    }
    var sets = pageIndex();
    var scores = new Map();
    postings.forEach(function (list, w) {
      list.forEach(function (p) {
        var key = p[0] + ":" + p[1];
        var entry = scores.get(key) || { row: p[0], k: p[1], peak: 0, words: 0, peaks: [] };
        entry.peak += p[2];
        entry.words += 1;
        if (p[2] > 0) entry.peaks.push(words[w] + " \u00d7" + p[2]);
        scores.set(key, entry);
      });
    });
    var hits = Array.from(scores.values()).filter(function (e) { return e.words === words.length; });
    hits.sort(function (a, b) { return (b.peak - a.peak) || (a.row - b.row) || (a.k - b.k); });
    results.textContent = "";
    if (!words.length || !hits.length) {
      results.appendChild(el("p", null, JSON.stringify(query) + " is not in this atlas: no feature's examples peak " +
        "on " + (words.length > 1 ? "these words" : "it") + " or contain " + (words.length > 1 ? "them" : "it") +
        " near their max token."));
      return;
    }
    results.appendChild(el("p", null, hits.length + " feature" + (hits.length === 1 ? "" : "s") + " for " +
      JSON.stringify(query) + ", most examples peaking on it first:"));
    if (cut.length) results.appendChild(el("p", { class: "caption" }, cut.join("; ") + "."));
    var list = el("ol", { class: "hits" });
    var shown = 0;
    function more() {
      hits.slice(shown, shown + 50).forEach(function (hit) {
        var at = sets.unit(hit.row);
        if (!at) return;
        var li = el("li");
        li.appendChild(el("a", { href: unitHref(at.set, at.unit, hit.k) }, at.set.slug + " N" + at.unit + " F" + hit.k));
        li.appendChild(el("span", { class: "sim" }, hit.peaks.length ? " peaks on " + hit.peaks.join(", ") :
          " near the central example's max token"));
        list.appendChild(li);
      });
      shown += 50;
      if (shown >= hits.length && button) button.remove();
    }
    results.appendChild(list);
    var button = hits.length > 50 ? el("button", { type: "button", class: "more" }, "More results") : null;
    if (button) { button.addEventListener("click", more); results.appendChild(button); }
    more();
  }

  Atlas.wordSearch = wordSearch;
})();
