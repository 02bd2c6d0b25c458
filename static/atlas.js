/* Neuron Atlas: the only script of the site. No framework and no network beyond the site's own files.
 *
 * Data comes from the site's JSON files (docs/sidecar-schema.md): fetched over http(s); over file://, where Chromium
 * refuses fetch(), from each file's twin X.json.js (window.ATLAS_DATA[key] = <the same JSON>) through <script src>.
 * Safety: dataset text is hostile, so text is only ever inserted with textContent (never innerHTML), and styles
 * only through the CSSOM (the Content-Security-Policy forbids inline script and inline style attributes).
 */
(function () {
  "use strict";

  var THEME_KEY = "atlas-theme";
  try {
    var saved = window.localStorage.getItem(THEME_KEY);
    if (saved === "dark" || saved === "light") document.documentElement.setAttribute("data-theme", saved);
  } catch (e) { /* storage may be disabled */ }

  var Atlas = (window.Atlas = {});
  var SVG_NS = "http://www.w3.org/2000/svg";
  var MISSING = 255;
  var LEVELS = 254;
  var EXAMPLES_SHOWN = 10;

  // ------------------------------------------------------------------------------------------------ helpers

  function data(key) { return (window.ATLAS_DATA || {})[key]; }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function svgEl(tag, attrs) {
    var node = document.createElementNS(SVG_NS, tag);
    if (attrs) Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    return node;
  }

  function body() { return document.body.dataset; }

  function modelRoot() { return body().model || ""; }

  /* The atlas's subject sets and the one index over their units (as builder.subjects.SubjectIndex): set i's units
   * are rows offset_i ... offset_i + size_i - 1 of the model-wide tables. `sets` is [{key, slug, size}, ...] in atlas
   * order; a slug defaults to the key. Units are {key, unit} pairs, never arithmetic encodings. */
  function SubjectIndex(sets) {
    var offset = 0;
    this.sets = sets.map(function (s) {
      var entry = { key: s.key, slug: s.slug || s.key, layer: s.layer, size: s.size, offset: offset,
                    kind: s.kind || "mlp" };
      offset += s.size;
      return entry;
    });
    this.total = offset;
    this.byKey = new Map(this.sets.map(function (s) { return [s.key, s]; }));
  }
  SubjectIndex.prototype.unit = function (row) {
    for (var i = 0; i < this.sets.length; i++) {
      var s = this.sets[i];
      if (row >= s.offset && row < s.offset + s.size) return { set: s, unit: row - s.offset };
    }
    return null;
  };
  SubjectIndex.prototype.ofLayer = function (layer) {
    return this.sets.filter(function (s) { return s.layer === layer; })[0] || null;
  };
  Atlas.SubjectIndex = SubjectIndex;

  /* The index of this page's atlas, from <body data-sets="key:slug:layer:size:kind,..."> or common.json. */
  function pageIndex() {
    // Unit pages leave the list out (it would repeat on every one): it comes with common.json.
    var sets = body().sets ? body().sets.split(",") : (Atlas.common ? Atlas.common.sets : []);
    return new SubjectIndex(sets.filter(function (s) { return s !== ""; })
      .map(function (entry) {
        var parts = entry.split(":");
        return { key: parts[0], slug: parts[1], layer: Number(parts[2]), size: Number(parts[3]),
                 kind: parts[4] || "mlp" };
      }));
  }

  /* A unit's page, or one of its features: a section of that page (#F<k>), which works from file:// too. */
  function unitHref(set, unit, feature) {
    return modelRoot() + set.slug + "/N" + unit + "/index.html" + (feature === undefined ? "" : "#F" + feature);
  }

  /* The feature this page's address names (#F<k>), or null. */
  function featureFromLocation() {
    var m = /^#F(\d+)$/.exec(window.location.hash);
    return m ? Number(m[1]) : null;
  }

  /* The same mapping as builder.render.display_token: newline ↵, tab ⇥, other controls as control pictures. */
  function displayToken(text) {
    return text.replace(/[\u0000-\u001f\u007f]/g, function (c) {
      if (c === "\n") return "\u21b5";
      if (c === "\t") return "\u21e5";
      if (c === "\u007f") return "\u2421";
      return String.fromCharCode(0x2400 + c.charCodeAt(0));
    });
  }

  function fmt(value, digits) {
    if (value === null || value === undefined || !isFinite(value)) return "\u2013";
    return Number(value).toPrecision(digits || 3).replace(/(\.\d*?)0+$/, "$1").replace(/\.$/, "");
  }

  /* The JSON document `url` (relative to this page), stored under `key` once loaded. */
  function loadData(key, url) {
    if (data(key)) return Promise.resolve(data(key));
    var loaded;
    if (window.location.protocol === "file:") {
      loaded = loadScript(url + ".js").then(function () {
        var document = data(key);
        if (!document) throw new Error(url + ".js did not define " + key);
        if (document.bin_base64 !== undefined && !document.blob) {
          var binary = atob(document.bin_base64), bytes = new Uint8Array(binary.length);
          for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
          document.blob = bytes;
        }
        return document;
      });
    } else {
      loaded = fetch(url).then(function (response) {
        if (!response.ok) throw new Error("cannot load " + url + " (HTTP " + response.status + ")");
        return response.json();
      }).then(async function (document) {
        if (document.bin) {
          var response = await fetch(new URL(document.bin, new URL(url, window.location.href)));
          if (!response.ok) throw new Error("cannot load " + document.bin + " (HTTP " + response.status + ")");
          document.blob = new Uint8Array(await response.arrayBuffer());
        }
        (window.ATLAS_DATA = window.ATLAS_DATA || {})[key] = document;
        return document;
      });
    }
    return loaded;
  }
  Atlas.loadData = loadData;
  // For static/index.js (the model index and word search, loaded by the model index page only).
  Atlas.lib = { el: el, fmt: fmt, data: data, body: body, modelRoot: modelRoot, unitHref: unitHref,
                pageIndex: pageIndex, SubjectIndex: SubjectIndex, hashParams: hashParams };

  function loadScript(src) {
    return new Promise(function (resolve, reject) {
      var script = el("script", { src: src });
      script.onload = resolve;
      script.onerror = function () { reject(new Error("cannot load " + src)); };
      document.head.appendChild(script);
    });
  }

  // ------------------------------------------------------------------------------------------------ decoding

  var CUT_STEPS_PER_UNIT = 20;  // the cut slider ends at the largest merge distance rounded up to 1/20 (at least 1)
  var TYPES = { u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, i4: Int32Array, f4: Float32Array };

  /* A packed field ([offset, length] in the document's .bin companion, loaded as `doc.blob`) -> zlib-inflated
   * bytes -> typed array (little-endian), as written by builder.render.codec.Blob. */
  async function unpack(doc, ref, dtype) {
    var bytes = doc.blob.subarray(ref[0], ref[0] + ref[1]);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    var buffer = await new Response(stream).arrayBuffer();
    var Type = TYPES[dtype];
    return new Type(buffer, 0, buffer.byteLength / Type.BYTES_PER_ELEMENT);
  }
  Atlas.unpack = unpack;

  /* Inverse of builder.render.codec.Blob.pack_json: inflated UTF-8 JSON. */
  async function unpackJson(doc, ref) {
    var bytes = await unpack(doc, ref, "u1");
    return JSON.parse(new TextDecoder().decode(bytes));
  }
  Atlas.unpackJson = unpackJson;

  /* A neuron sidecar decoded; `common` is the atlas's common vocabulary (data/common.json) that its own `vocab`
   * (the rarer tokens it shows) continues. */
  async function decodeNeuron(raw, common) {
    var ex = raw.examples, iv = raw.intervals;
    var width = raw.window.before + 1 + raw.window.after;
    var parts = await Promise.all([
      unpack(raw, ex.tokens, ex.token_dtype), unpack(raw, ex.activation, "u1"), unpack(raw, ex.importance, "u1"),
      unpack(raw, ex.sequence, "u4"), unpack(raw, ex.position, "u4"), unpack(raw, ex.cluster, "u4"),
      unpack(raw, raw.linkage.children, "u4"), unpack(raw, raw.linkage.distance, "f4"), unpackJson(raw, raw.vocab),
      unpack(raw, iv.interval, "u1"), unpack(raw, iv.sequence, "u4"), unpack(raw, iv.position, "u4"),
      unpack(raw, iv.tokens, ex.token_dtype)]);
    return {
      raw: raw, n: ex.count, width: width, before: raw.window.before, tokens: parts[0], act: parts[1],
      imp: parts[2], seq: parts[3], pos: parts[4], labels: Int32Array.from(parts[5]), children: parts[6],
      distance: parts[7], vocab: common.concat(parts[8]), lo: ex.activation_range[0],
      hi: ex.activation_range[1], sentinel: ex.token_dtype === "u2" ? 0xffff : 0xffffffff,
      threshold: raw.cluster_threshold,
      intervals: { bounds: iv.bounds, interval: parts[9], seq: parts[10], pos: parts[11], act: iv.activation,
                   tokens: parts[12] }
    };
  }
  Atlas.decodeNeuron = decodeNeuron;

  function activation(N, code) { return code === MISSING ? NaN : N.lo + code / LEVELS * (N.hi - N.lo); }
  function importance(code) { return code === MISSING ? NaN : code / LEVELS; }
  function maxActivation(N, i) { return activation(N, N.act[i * N.width + N.before]); }
  function tokenText(N, id) { return id < N.vocab.length ? N.vocab[id] : "<" + id + ">"; }

  // ------------------------------------------------------------------------------------------------ clustering

  /* Flat clusters of a scipy linkage cut at distance t, like fcluster(Z, t, criterion="distance"): leaves share a
   * cluster when the largest merge distance below their common ancestor is <= t. Ids are ranked by size (largest
   * first), ties by first appearance, like builder.cluster.ranked_labels. */
  function fcluster(children, distance, n, t) {
    var parent = new Int32Array(n), rep = new Int32Array(Math.max(0, 2 * n - 1));
    var md = maxDistances(children, distance, n);
    var i;
    for (i = 0; i < n; i++) { parent[i] = i; rep[i] = i; }
    function find(x) { while (parent[x] !== x) { parent[x] = parent[parent[x]]; x = parent[x]; } return x; }
    for (i = 0; i < n - 1; i++) {
      var a = children[2 * i], b = children[2 * i + 1];
      rep[n + i] = rep[a];
      if (md[i] <= t) parent[find(rep[a])] = find(rep[b]);
    }
    var raw = new Int32Array(n), count = new Map(), first = new Map();
    for (i = 0; i < n; i++) {
      raw[i] = find(i);
      count.set(raw[i], (count.get(raw[i]) || 0) + 1);
      if (!first.has(raw[i])) first.set(raw[i], i);
    }
    var ids = Array.from(count.keys()).sort(function (x, y) {
      return (count.get(y) - count.get(x)) || (first.get(x) - first.get(y));
    });
    var rank = new Map(ids.map(function (id, r) { return [id, r]; }));
    return Int32Array.from(raw, function (id) { return rank.get(id); });
  }
  Atlas.fcluster = fcluster;

  /* Per merge, the largest merge distance at or below it (a cut at t keeps merges whose value is <= t). */
  function maxDistances(children, distance, n) {
    var md = new Float64Array(Math.max(0, n - 1));
    for (var i = 0; i < n - 1; i++) {
      var a = children[2 * i], b = children[2 * i + 1];
      md[i] = Math.max(distance[i], a >= n ? md[a - n] : 0, b >= n ? md[b - n] : 0);
    }
    return md;
  }

  /* One colour code everywhere (dendrogram, swatches, example borders): the COLOURED largest clusters get a class
   * of their own (static/atlas.css .c0-.c7 set --c), the rest share grey (.cx). */
  var COLOURED = 8;
  function colourClass(k) { return k < COLOURED ? "c" + k : "cx"; }
  function setColour(node, k) {
    node.classList.forEach(function (name) { if (/^c(\d+|x)$/.test(name)) node.classList.remove(name); });
    if (k !== null && k !== undefined) node.classList.add(colourClass(k));
  }
  Atlas.colourClass = colourClass;

  // ------------------------------------------------------------------------------------------------ tooltip

  var tip = null;

  function showTip(target) {
    if (!tip) {
      tip = el("div", { id: "atlas-tip", role: "tooltip" });
      document.body.appendChild(tip);
    }
    var lines = [JSON.stringify(target._raw || "")];
    lines.push("activation " + fmt(target._act, 4));
    lines.push("importance " + (isNaN(target._imp) ? "\u2013 (not scored)" : fmt(target._imp, 3)));
    lines.push("offset " + (target._offset > 0 ? "+" : "") + target._offset + " from the max token");
    tip.textContent = lines.join("\n");
    tip.hidden = false;
    var box = target.getBoundingClientRect();
    var left = Math.min(window.scrollX + box.left, window.scrollX + document.documentElement.clientWidth - 260);
    tip.style.left = Math.max(window.scrollX + 4, left) + "px";
    tip.style.top = (window.scrollY + box.bottom + 6) + "px";
    target.setAttribute("aria-describedby", "atlas-tip");
  }

  function hideTip(target) {
    if (tip) tip.hidden = true;
    if (target) target.removeAttribute("aria-describedby");
  }

  function isToken(node) { return node && node.classList && node.classList.contains("tok"); }

  document.addEventListener("mouseover", function (e) { if (isToken(e.target)) showTip(e.target); });
  document.addEventListener("mouseout", function (e) { if (isToken(e.target)) hideTip(e.target); });
  document.addEventListener("focusin", function (e) { if (isToken(e.target)) showTip(e.target); });
  document.addEventListener("focusout", function (e) { if (isToken(e.target)) hideTip(e.target); });

  // ------------------------------------------------------------------------------------------------ examples

  var view = { byImportance: false, order: "corpus", labels: null, cut: null, tree: null };

  function paint(span, byImportance) {
    var alpha, rgb;
    if (byImportance) {
      if (isNaN(span._imp)) { span.style.backgroundColor = ""; span.style.color = ""; span.classList.add("na"); return; }
      alpha = span._imp; rgb = "0,160,90";
    } else {
      span.classList.remove("na");
      var v = span._act, hi = span._hi > 0 ? span._hi : 1;
      if (isNaN(v)) { span.style.backgroundColor = ""; return; }
      alpha = Math.min(1, Math.abs(v) / hi); rgb = v >= 0 ? "255,140,0" : "60,130,255";
    }
    alpha = Math.round(alpha * 1000) / 1000;
    span.style.backgroundColor = alpha > 0 ? "rgba(" + rgb + "," + alpha + ")" : "";
    span.style.color = alpha > 0.55 ? "#111" : "";
  }

  function paintExample(card, byImportance) {
    card.querySelectorAll(".tok").forEach(function (span) { paint(span, byImportance); });
    var button = card.querySelector(".imp-toggle");
    if (button) button.setAttribute("aria-pressed", byImportance ? "true" : "false");
    card.classList.toggle("by-importance", byImportance);
  }

  /* A line of tokens: ids[0..width) of a window, the max token at column `before`; values per column. */
  function tokenLine(N, ids, values, scores) {
    var line = el("p", { class: "toks", dir: "ltr" });
    for (var c = 0; c < ids.length; c++) {
      var id = ids[c];
      if (id === N.sentinel) continue;
      var raw = tokenText(N, id);
      var span = el("span", { class: c === N.before ? "tok max" : "tok", tabindex: c === N.before ? "0" : "-1" },
        displayToken(raw));
      span._raw = raw;
      span._act = values ? values[c] : NaN;
      span._imp = scores && c <= N.before ? scores[c] : NaN;
      span._offset = c - N.before;
      span._hi = N.hi;
      span.setAttribute("aria-label", displayToken(raw) + (isNaN(span._act) ? "" : ", activation " + fmt(span._act, 3)));
      paint(span, false);
      line.appendChild(span);
    }
    line.addEventListener("keydown", tokenKeys);
    return line;
  }

  function renderExample(N, index) {
    var card = el("div", { class: "example", "data-index": String(index) });
    setColour(card, view.labels ? view.labels[index] : N.labels[index]);
    var head = el("div", { class: "ex-head" });
    head.appendChild(el("span", { class: "chip", "aria-hidden": "true" }));
    head.appendChild(el("span", { class: "ex-meta" }, "max " + fmt(maxActivation(N, index), 3) + " \u00b7 sequence " +
      N.seq[index] + ", position " + N.pos[index] + " \u00b7 leaf " + index));
    var toggle = el("button", { type: "button", class: "imp-toggle", "aria-pressed": "false" }, "importance");
    toggle.addEventListener("click", function () {
      paintExample(card, toggle.getAttribute("aria-pressed") !== "true");
    });
    head.appendChild(toggle);
    card.appendChild(head);
    var ids = [], values = [], scores = [];
    for (var c = 0; c < N.width; c++) {
      ids.push(N.tokens[index * N.width + c]);
      values.push(activation(N, N.act[index * N.width + c]));
      scores.push(c <= N.before ? importance(N.imp[index * (N.before + 1) + c]) : NaN);
    }
    card.appendChild(tokenLine(N, ids, values, scores));
    card.addEventListener("mouseenter", function () { if (view.tree) view.tree.highlight(index, true); });
    card.addEventListener("mouseleave", function () { if (view.tree) view.tree.highlight(index, false); });
    if (view.byImportance) paintExample(card, true);
    return card;
  }

  /* Roving focus inside one example: arrows move between tokens, so Tab visits one token per example. */
  function tokenKeys(e) {
    if (!isToken(e.target)) return;
    var tokens = Array.prototype.slice.call(e.currentTarget.querySelectorAll(".tok"));
    var at = tokens.indexOf(e.target), to = at;
    if (e.key === "ArrowRight") to = Math.min(tokens.length - 1, at + 1);
    else if (e.key === "ArrowLeft") to = Math.max(0, at - 1);
    else if (e.key === "Home") to = 0;
    else if (e.key === "End") to = tokens.length - 1;
    else return;
    e.preventDefault();
    tokens[at].setAttribute("tabindex", "-1");
    tokens[to].setAttribute("tabindex", "0");
    tokens[to].focus();
  }

  /* The groups of a cut: per cluster id (ranked by size, ties by first example), its members in corpus order,
   * its central example and its summary. At the configured cut the builder's centrals and summaries are used; at
   * another cut they are recomputed: central = the member with the least summed cophenetic distance to the other
   * members, first on ties (the sidecar holds the dendrogram, not the pairwise distances). */
  function groupsOf(N, labels, configured) {
    var k = 0, i;
    for (i = 0; i < N.n; i++) k = Math.max(k, labels[i] + 1);
    var groups = [];
    for (var c = 0; c < k; c++) groups.push({ k: c, members: [] });
    for (i = 0; i < N.n; i++) groups[labels[i]].members.push(i);
    groups.forEach(function (g) {
      g.central = configured ? N.raw.clusters[g.k].central : centralOf(N, g.members);
      if (!configured) g.summary = summaryOf(N, g.members);  // the configured cut's summaries are in the page
    });
    return groups;
  }
  Atlas.groupsOf = groupsOf;

  /* Cophenetic distances between the examples (the height of the merge that first joins two of them), as
   * scipy.cluster.hierarchy.cophenet gives them: a square matrix, built once per neuron from the linkage. */
  function cophenetic(N) {
    if (N.cophenetic) return N.cophenetic;
    var n = N.n, square = new Float64Array(n * n), members = [];
    for (var i = 0; i < n; i++) members.push([i]);
    for (var m = 0; m < n - 1; m++) {
      var a = members[N.children[2 * m]], b = members[N.children[2 * m + 1]], d = N.distance[m];
      a.forEach(function (x) { b.forEach(function (y) { square[x * n + y] = d; square[y * n + x] = d; }); });
      members.push(a.concat(b));
    }
    N.cophenetic = square;
    return square;
  }

  function centralOf(N, members) {
    var square = cophenetic(N), best = members[0], bestSum = Infinity;
    members.forEach(function (i) {
      var sum = 0;
      members.forEach(function (j) { sum += square[i * N.n + j]; });
      if (sum < bestSum) { bestSum = sum; best = i; }
    });
    return best;
  }

  function rankedCounts(values) {
    var count = new Map(), first = new Map();
    values.forEach(function (v, i) { count.set(v, (count.get(v) || 0) + 1); if (!first.has(v)) first.set(v, i); });
    return Array.from(count.keys()).sort(function (a, b) {
      return (count.get(b) - count.get(a)) || (first.get(a) - first.get(b));
    }).map(function (v) { return [v, count.get(v)]; });
  }

  /* The same summary as builder.render.sidecars.feature_summary, from the sidecar's (quantised) activations. */
  function summaryOf(N, members) {
    var maxTokens = members.map(function (i) { return N.tokens[i * N.width + N.before]; });
    var before = N.before > 0 ? members.map(function (i) { return N.tokens[i * N.width + N.before - 1]; })
      .filter(function (t) { return t !== N.sentinel; }) : [];
    var acts = members.map(function (i) { return maxActivation(N, i); });
    var top = rankedCounts(before);
    return { top: rankedCounts(maxTokens).slice(0, 3), before: top.length ? top[0] : null,
             mean: acts.reduce(function (a, b) { return a + b; }, 0) / acts.length,
             max: Math.max.apply(null, acts), size: members.length };
  }
  Atlas.summaryOf = summaryOf;

  function quoted(N, id) { return "\u201c" + displayToken(tokenText(N, id)) + "\u201d"; }

  /* The same text as builder.render.pages.summary_text. */
  function summaryText(N, summary) {
    if (summary.size === 1) {
      return quoted(N, summary.top[0][0]) + (summary.before ? " after " + quoted(N, summary.before[0]) : "") +
        " \u00b7 " + fmt(summary.max, 3);
    }
    var parts = [summary.top.map(function (p) { return quoted(N, p[0]) + " \u00d7" + p[1]; }).join(", ")];
    if (summary.before) parts.push("after " + quoted(N, summary.before[0]) + " \u00d7" + summary.before[1]);
    parts.push("mean " + fmt(summary.mean, 3) + ", max " + fmt(summary.max, 3));
    return parts.join(" \u00b7 ");
  }
  Atlas.summaryText = summaryText;

  function orderedMembers(N, group) {
    var rest = group.members.filter(function (i) { return i !== group.central; });
    if (view.order === "activation") {
      return group.members.slice().sort(function (a, b) { return (maxActivation(N, b) - maxActivation(N, a)) || a - b; });
    }
    return [group.central].concat(rest);
  }

  function fillExamples(section, N, group, shown) {
    section.querySelectorAll(".examples, .more").forEach(function (node) { node.remove(); });
    var box = el("div", { class: "examples" });
    var similar = section.querySelector(".similar");
    if (similar) section.insertBefore(box, similar); else section.appendChild(box);
    var order = orderedMembers(N, group);
    var append = function (from, to) {
      for (var j = from; j < to; j++) box.appendChild(renderExample(N, order[j]));
    };
    append(0, Math.min(order.length, shown));
    if (order.length > shown) {
      var more = el("button", { type: "button", class: "more" }, "Show " + (order.length - shown) + " more example" +
        (order.length - shown === 1 ? "" : "s"));
      more.addEventListener("click", function () {
        append(shown, order.length);
        more.remove();
      });
      box.after(more);
    }
    section.querySelectorAll(".ex-static, .ex-meta").forEach(function (node) {
      if (!box.contains(node)) node.classList.add("js-hidden");
    });
  }

  /* The unit's similar features (similar.json), loaded the first time a reader opens a list of them. */
  var similarLoad = null;
  function loadSimilar() {
    if (!similarLoad) {
      similarLoad = loadData("similar", "similar.json").then(async function (doc) {
        return { rows: await unpack(doc, doc.rows, "i4"), text: await unpackJson(doc, doc.text) };
      });
    }
    return similarLoad;
  }

  function fillSimilar(details, S, k) {
    var list = el("ol", { class: "similar-list" });
    var sets = pageIndex().sets;
    for (var i = 0; i < S.rows.length; i += 5) {
      if (S.rows[i] !== k) continue;
      var nb = S.rows, text = S.text[i / 5], other = sets[nb[i + 1]];
      if (!other) continue;
      var li = el("li");
      li.appendChild(el("a", { href: unitHref(other, nb[i + 2], nb[i + 3]) },
        other.slug + " N" + nb[i + 2] + " F" + nb[i + 3]));
      li.appendChild(el("span", { class: "sim" }, " " + (nb[i + 4] / 10000).toFixed(2) + " \u00b7 \u201c" +
        text[3] + "\u201d \u00d7" + text[4] + " of " + text[5] + " \u00b7 "));
      var snippet = el("span", { class: "snippet", dir: "ltr" });
      snippet.appendChild(document.createTextNode(text[0]));
      snippet.appendChild(el("mark", null, text[1]));
      snippet.appendChild(document.createTextNode(text[2]));
      li.appendChild(snippet);
      list.appendChild(li);
    }
    details.appendChild(list);
  }

  function renderSimilar(section, N, k) {
    var count = N.raw.clusters[k].similar;
    var box = el("div", { class: "similar" });
    section.appendChild(box);
    var details = el("details");
    details.appendChild(el("summary", null, "Similar features (" + count + ")"));
    box.appendChild(details);
    if (!count) {
      var none = el("p", null, "No feature of another neuron reaches the similarity threshold (");
      none.appendChild(el("a", { href: modelRoot() + "method/index.html#similar" }, "why"));
      none.appendChild(document.createTextNode(")."));
      details.appendChild(none);
      return;
    }
    var filled = false;
    var fill = function () {
      if (filled || !details.open) return;
      filled = true;
      loadSimilar().then(function (S) { fillSimilar(details, S, k); }, function (error) {
        details.appendChild(el("p", { class: "error" }, "Could not load the similar features: " + error.message));
      });
    };
    details.addEventListener("toggle", fill);
    fill();
  }

  /* The feature list at a cut other than the configured one: sections built from the groups, the same layout as
   * the static list (clusters of 2+ examples, then one folded group of single examples). */
  function renderRecut(N, groups) {
    var box = document.getElementById("features-recut"), contents = document.getElementById("contents-recut");
    box.textContent = "";
    contents.textContent = "";
    var table = el("table", { class: "data contents" }), head = el("tr");
    ["Cluster", "Size", "Share", "Summary: max tokens \u00b7 token before \u00b7 activation"]
      .forEach(function (h) { head.appendChild(el("th", { scope: "col" }, h)); });
    table.appendChild(el("thead")).appendChild(head);
    var tbody = table.appendChild(el("tbody"));
    var singles = groups.filter(function (g) { return g.members.length === 1; });
    var makeSection = function (g) {
      var section = el("section", { class: "feature", id: "C" + g.k, "data-cluster": String(g.k) });
      setColour(section, g.k);
      var h = el("h3");
      h.appendChild(document.createTextNode("Cluster C" + g.k + " "));
      h.appendChild(el("small", null, g.members.length + " example" + (g.members.length === 1 ? "" : "s") + " (" +
        fmt(100 * g.members.length / N.n, 3) + "%) \u00b7 " + summaryText(N, g.summary)));
      section.appendChild(h);
      fillExamples(section, N, g, EXAMPLES_SHOWN);
      return section;
    };
    groups.forEach(function (g) {
      if (g.members.length === 1) return;
      var tr = el("tr");
      setColour(tr, g.k);
      var td = el("td");
      td.appendChild(el("a", { href: "#C" + g.k }, "C" + g.k));
      tr.appendChild(td);
      tr.appendChild(el("td", null, String(g.members.length)));
      tr.appendChild(el("td", null, fmt(100 * g.members.length / N.n, 3) + "%"));
      tr.appendChild(el("td", { class: "summary" }, summaryText(N, g.summary)));
      tbody.appendChild(tr);
      box.appendChild(makeSection(g));
    });
    if (singles.length) {
      var tr = el("tr", { class: "cx" });
      tr.appendChild(el("td")).appendChild(el("a", { href: "#unclustered-recut" }, "C" + singles[0].k + "\u2013C" +
        singles[singles.length - 1].k));
      tr.appendChild(el("td", null, String(singles.length)));
      tr.appendChild(el("td", null, fmt(100 * singles.length / N.n, 3) + "%"));
      tr.appendChild(el("td", { class: "summary" }, singles.length + " unclustered single example" +
        (singles.length === 1 ? "" : "s")));
      tbody.appendChild(tr);
      var details = el("details", { class: "unclustered", id: "unclustered-recut" });
      details.appendChild(el("summary", null, "Unclustered examples (" + singles.length + ")"));
      singles.forEach(function (g) { details.appendChild(makeSection(g)); });
      box.appendChild(details);
    }
    contents.appendChild(table);
  }

  /* The features at the configured cut: each section (id "F<k>") gets its examples and its similar features. */
  function renderStatic(N) {
    var groups = groupsOf(N, N.labels, true);
    document.querySelectorAll("#features-static .feature").forEach(function (section) {
      var k = Number(section.id.slice(1));
      fillExamples(section, N, groups[k], EXAMPLES_SHOWN);
      if (!section.querySelector(".similar")) renderSimilar(section, N, k);
    });
  }

  /* Each feature section's heading gets its size and summary from the contents table (the page prints them once),
   * and its citation line a BibTeX block: the unit's citation (the footer's line) for feature k. */
  function finishSections(prov) {
    document.querySelectorAll("#features-static section.feature").forEach(function (section) {
      var row = document.querySelector('#contents-static a[href="#' + section.id + '"]'), cells = row && row.closest("tr").cells;
      if (!cells) return;
      var size = Number(cells[1].textContent);
      section.querySelector("h3").appendChild(el("small", null, " " + size + " example" + (size === 1 ? "" : "s") +
        " (" + cells[2].textContent + ") \u00b7 " + cells[3].textContent));
    });
    var unit = unitCitation(Atlas.neuron.raw.path);
    document.querySelectorAll("#features-static .feature").forEach(function (feature) {
      var line = feature.querySelector(":scope > .cite-line"), k = feature.id.slice(1);
      if (!line) return;
      var details = el("details", { class: "bibtex" });
      details.appendChild(el("summary", null, "BibTeX"));
      details.appendChild(el("pre", { class: "cite" }, bibtex(Object.assign({}, unit, {
        key: citationKey(Atlas.neuron.raw.path + "F" + k + "/"), title: unit.title + " feature " + k,
        url: unit.url + "#F" + k }), prov)));
      line.after(details);
    });
  }

  /* The feature the address names (#F<k>, what a feature's own page once showed): its similar features open, and
   * back in view once the examples above it are drawn. */
  function revealFeature() {
    var k = featureFromLocation(), section = k === null ? null : document.getElementById("F" + k);
    if (!section) return;
    var group = section.closest("details"), similar = section.querySelector(".similar details");
    if (group) group.open = true;
    if (similar) similar.open = true;
    section.scrollIntoView({ block: "start" });
  }

  /* Show the list for a cut: the static sections at the configured cut, a regrouped list at any other. */
  function showCut(N, labels, t) {
    var configured = Math.abs(t - N.threshold) < 1e-9;
    view.labels = labels;
    view.cut = t;
    var staticList = document.getElementById("features-static"), recut = document.getElementById("features-recut");
    var staticContents = document.getElementById("contents-static"), recutContents = document.getElementById("contents-recut");
    if (staticList) {
      staticList.hidden = !configured;
      recut.hidden = configured;
      if (staticContents) { staticContents.hidden = !configured; recutContents.hidden = configured; }
      if (!configured) renderRecut(N, groupsOf(N, labels, false));
    }
    document.querySelectorAll(".example").forEach(function (card) { setColour(card, labels[Number(card.dataset.index)]); });
    var reset = document.getElementById("cut-reset");
    if (reset) reset.hidden = configured;
    try {
      var feature = featureFromLocation();
      window.history.replaceState(null, "", configured ? window.location.pathname + window.location.search +
        (feature === null ? "" : "#F" + feature) : "#cut=" + fmt(t, 4));
    } catch (e) { /* file:// in some browsers */ }
  }

  /* Scroll to example `index` wherever it is listed (opening its folded group or "show more" first). */
  function revealExample(index) {
    var containers = ["features-recut", "features-static"].map(function (id) { return document.getElementById(id); })
      .filter(function (box) { return box && !box.hidden; });
    var root = containers[0] || document;
    var card = root.querySelector('.example[data-index="' + index + '"]');
    if (!card) {
      root.querySelectorAll("button.more").forEach(function (button) { button.click(); });
      card = root.querySelector('.example[data-index="' + index + '"]');
    }
    if (!card) return null;
    var details = card.closest("details");
    if (details) details.open = true;
    card.scrollIntoView({ block: "center" });
    card.classList.add("hl");
    setTimeout(function () { card.classList.remove("hl"); }, 2000);
    return card;
  }
  Atlas.revealExample = revealExample;

  /* The colour legend (only coloured tokens need it, so the script that colours them writes it). */
  function renderLegend() {
    var box = document.getElementById("legend");
    if (!box) return;
    [["act", "activation: 0 \u2192 this neuron's max (blue: negative)"],
     ["imp", "importance: the drop in the max token's activation when the token is masked, 0 \u2192 1"]]
      .forEach(function (entry) {
        var item = el("span");
        item.appendChild(el("span", { class: "ramp " + entry[0], "aria-hidden": "true" }));
        item.appendChild(document.createTextNode(" " + entry[1]));
        box.appendChild(item);
      });
    box.appendChild(el("span", null, "Tokens after the max token are not scored for importance."));
  }

  function renderIntervals(N) {
    var box = document.getElementById("interval-list");
    if (!box) return;
    var iv = N.intervals, count = iv.interval.length;
    var n = iv.bounds.length - 1;
    box.before(el("p", { class: "caption" }, "Sequences whose highest activation falls under the example threshold, " +
      "in equal intervals of [0, " + Atlas.common.provenance.threshold + " \u00d7 max): the first ones in corpus " +
      "order of each interval. The max token is underlined."));
    if (!count) { box.appendChild(el("p", null, "No sequence fell below the threshold (or the neuron is dead).")); return; }
    for (var i = n - 1; i >= 0; i--) {
      var block = el("div", { class: "interval" });
      block.appendChild(el("h3", null, "[" + fmt(iv.bounds[i], 3) + ", " + fmt(iv.bounds[i + 1], 3) + ")"));
      var any = false;
      for (var j = 0; j < count; j++) {
        if (iv.interval[j] !== i) continue;
        any = true;
        var ids = Array.prototype.slice.call(iv.tokens, j * N.width, (j + 1) * N.width);
        var values = ids.map(function (_, c) { return c === N.before ? iv.act[j] : NaN; });
        var card = el("div", { class: "iv-example cx" });
        card.appendChild(el("p", { class: "ex-meta" }, "max " + fmt(iv.act[j], 3) + " \u00b7 sequence " + iv.seq[j] +
          ", position " + iv.pos[j]));
        card.appendChild(tokenLine(N, ids, values, null));
        block.appendChild(card);
      }
      if (!any) block.appendChild(el("p", { class: "caption" }, "No sequence peaked in this interval."));
      box.appendChild(block);
    }
  }

  // ------------------------------------------------------------------------------------------------ charts

  /* Round tick values covering [lo, hi]: steps of 1, 2 or 5 × 10^k, about `count` of them. */
  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    var raw = (hi - lo) / Math.max(1, count), mag = Math.pow(10, Math.floor(Math.log10(raw)));
    var step = [1, 2, 5, 10].map(function (m) { return m * mag; }).filter(function (s) { return s >= raw; })[0];
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Math.round(v / step) * step);
    return ticks;
  }
  Atlas.niceTicks = niceTicks;

  /* A unit's histogram with its bins' edges from the shared list: bin i of the atlas lies between edges i - 1 and
   * i (null: unbounded); the sidecar keeps its non-empty span, from bin `first`. */
  function histogramOf(hist, shared) {
    var edges = [];
    for (var i = hist.first - 1; i < hist.first + hist.counts.length; i++) {
      edges.push(i < 0 || i >= shared.length ? null : shared[i]);
    }
    return { edges: edges, counts: hist.counts };
  }

  function drawHistogram(box, hist, maxActivation, threshold) {
    var counts = hist.counts, edges = hist.edges;
    if (!box || !counts.length) { if (box) box.textContent = "No activations recorded."; return; }
    var W = 600, H = 200, left = 44, right = 8, bottom = 30, top = 24;
    var plotH = H - bottom - top;
    var chart = svgEl("svg", { viewBox: "0 0 " + W + " " + H, class: "hist", role: "img", tabindex: "0",
                               "aria-label": "Activation histogram; arrow keys read the bins" });
    var peakCount = Math.max.apply(null, counts);
    var peak = Math.log10(peakCount + 1) || 1;
    var bw = (W - left - right) / counts.length;
    var finite = function (i) { return edges[i] === null ? null : edges[i]; };
    var lowEdge = finite(1) !== null && finite(0) === null ? edges[1] - (edges[2] - edges[1] || 1) : edges[0];
    var highEdge = edges[counts.length] === null ? edges[counts.length - 1] + (edges[counts.length - 1] -
      (edges[counts.length - 2] === null ? lowEdge : edges[counts.length - 2])) : edges[counts.length];
    var lower = function (i) { return i === 0 && edges[0] === null ? lowEdge : edges[i]; };
    var upper = function (i) { return i + 1 === counts.length && edges[i + 1] === null ? highEdge : edges[i + 1]; };
    function xOf(value) {  // linear inside each bin, bins of equal width
      for (var i = 0; i < counts.length; i++) {
        var a = lower(i), b = upper(i);
        if (value <= b || i === counts.length - 1) return left + (i + Math.min(1, Math.max(0, (value - a) / ((b - a) || 1)))) * bw;
      }
      return W - right;
    }
    var readout = document.getElementById("hist-readout");
    var bars = [];
    function describe(i) {
      return "(" + (edges[i] === null ? "\u2212\u221e" : fmt(edges[i], 3)) + ", " +
        (edges[i + 1] === null ? "\u221e" : fmt(edges[i + 1], 3)) + "]: " + counts[i] + " token" + (counts[i] === 1 ? "" : "s");
    }
    function select(i) {
      bars.forEach(function (bar, j) { bar.classList.toggle("on", j === i); });
      if (readout) readout.textContent = i === null ? "" : "Bin " + describe(i);
      chart._selected = i;
    }
    counts.forEach(function (count, i) {
      var h = Math.log10(count + 1) / peak * plotH;
      var bar = svgEl("rect", { x: left + i * bw, y: H - bottom - h, width: Math.max(1, bw - 1), height: h,
                                class: "bar" });
      var hit = svgEl("rect", { x: left + i * bw, y: top, width: bw, height: plotH, class: "hit" });
      var title = svgEl("title");
      title.textContent = describe(i);
      hit.appendChild(title);
      hit.addEventListener("mouseenter", function () { select(i); });
      bars.push(bar);
      chart.appendChild(bar);
      chart.appendChild(hit);
    });
    chart.addEventListener("mouseleave", function () { select(null); });
    chart.addEventListener("focus", function () { if (chart._selected === null || chart._selected === undefined) select(0); });
    chart.addEventListener("blur", function () { select(null); });
    chart.addEventListener("keydown", function (e) {
      var at = chart._selected === null || chart._selected === undefined ? 0 : chart._selected;
      if (e.key === "ArrowRight") at = Math.min(counts.length - 1, at + 1);
      else if (e.key === "ArrowLeft") at = Math.max(0, at - 1);
      else return;
      e.preventDefault();
      select(at);
    });
    chart.appendChild(svgEl("line", { x1: left, x2: W - right, y1: H - bottom, y2: H - bottom, class: "axis" }));
    chart.appendChild(svgEl("line", { x1: left, x2: left, y1: top, y2: H - bottom, class: "axis" }));
    // x ticks at round values, dropping any that would crowd the previous one; 0 gets its own mark.
    var lastX = -Infinity;
    niceTicks(lowEdge, highEdge, 6).concat([0]).sort(function (a, b) { return a - b; }).forEach(function (v, i, all) {
      if (i > 0 && v === all[i - 1]) return;
      if (v < lowEdge || v > highEdge) return;
      var x = xOf(v);
      if (x - lastX < 34 && v !== 0) return;
      lastX = x;
      chart.appendChild(svgEl("line", { x1: x, x2: x, y1: H - bottom, y2: H - bottom + 4,
                                        class: v === 0 ? "axis zero" : "axis" }));
      var label = svgEl("text", { x: x, y: H - bottom + 15, "text-anchor": "middle", class: v === 0 ? "label zero" : "label" });
      label.textContent = fmt(v, 3);
      chart.appendChild(label);
    });
    if (lowEdge < 0 && highEdge > 0) {
      chart.appendChild(svgEl("line", { x1: xOf(0), x2: xOf(0), y1: top, y2: H - bottom, class: "zero-line" }));
    }
    var xl = svgEl("text", { x: W - right, y: H - 2, "text-anchor": "end", class: "label" });
    xl.textContent = "activation";
    chart.appendChild(xl);
    // y ticks at counts 1, 10, 100, ... on the log scale.
    for (var c = 1; c <= peakCount; c *= 10) {
      var y = H - bottom - Math.log10(c + 1) / peak * plotH;
      chart.appendChild(svgEl("line", { x1: left - 4, x2: left, y1: y, y2: y, class: "axis" }));
      var yl = svgEl("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "label" });
      yl.textContent = c >= 1000 ? (c / 1000) + "k" : String(c);
      chart.appendChild(yl);
    }
    var ylabel = svgEl("text", { x: 2, y: 12, class: "label" });
    ylabel.textContent = "tokens (log scale)";
    chart.appendChild(ylabel);
    if (maxActivation > 0 && threshold) {
      var x = xOf(maxActivation * threshold);
      chart.appendChild(svgEl("line", { x1: x, x2: x, y1: top, y2: H - bottom, class: "marker" }));
      // The label sits in the top margin, above every bar.
      var anchor = x > W - 150 ? "end" : x < left + 150 ? "start" : "middle";
      var t = svgEl("text", { x: x, y: top - 6, "text-anchor": anchor, class: "label marker-label" });
      t.textContent = "examples \u2265 " + fmt(maxActivation * threshold, 3);
      chart.appendChild(t);
    }
    box.appendChild(chart);
    box.appendChild(el("p", { class: "caption" }, "Activations over every token of the dataset: token counts on a " +
      "log scale; bins grow geometrically away from 0 (hover or focus and use the arrow keys to read a bin)."));
  }

  function Dendrogram(box, N, onCut) {
    var n = N.n, W = 900, H = 210, left = 40, right = 70, bottom = 12, top = 10;
    var md = maxDistances(N.children, N.distance, n);
    var ymax = Math.max(Number(document.getElementById("cut").max) || 1, md.length ? md[md.length - 1] : 0) * 1.02;
    var y = function (d) { return top + (1 - d / ymax) * (H - top - bottom); };
    var xs = new Float64Array(2 * n - 1), heights = new Float64Array(2 * n - 1);
    // Leaf order as scipy's dendrogram: depth-first from the root, left child first.
    var order = [], stack = [2 * n - 2];
    while (stack.length) {
      var node = stack.pop();
      if (node < n) { order.push(node); continue; }
      stack.push(N.children[2 * (node - n) + 1]);
      stack.push(N.children[2 * (node - n)]);
    }
    var step = (W - left - right) / n;
    order.forEach(function (leaf, r) { xs[leaf] = left + (r + 0.5) * step; });
    for (var i = 0; i < n - 1; i++) {
      xs[n + i] = (xs[N.children[2 * i]] + xs[N.children[2 * i + 1]]) / 2;
      heights[n + i] = N.distance[i];
    }
    var chart = svgEl("svg", { viewBox: "0 0 " + W + " " + H, class: "dendro" });
    chart.appendChild(svgEl("line", { x1: left, x2: left, y1: y(0), y2: y(ymax), class: "axis" }));
    niceTicks(0, ymax, 5).forEach(function (d) {
      chart.appendChild(svgEl("line", { x1: left - 4, x2: left, y1: y(d), y2: y(d), class: "axis" }));
      var label = svgEl("text", { x: left - 6, y: y(d) + 4, "text-anchor": "end", class: "label" });
      label.textContent = fmt(d, 2);
      chart.appendChild(label);
    });
    var links = [];
    for (i = 0; i < n - 1; i++) {
      var a = N.children[2 * i], b = N.children[2 * i + 1];
      var path = svgEl("path", { d: "M" + xs[a] + " " + y(heights[a]) + "V" + y(heights[n + i]) + "H" + xs[b] + "V" +
                                    y(heights[b]), class: "link" });
      links.push(path);
      chart.appendChild(path);
    }
    var configured = svgEl("line", { x1: left, x2: W - right, y1: y(N.threshold), y2: y(N.threshold), class: "configured" });
    chart.appendChild(configured);
    var leaves = [];
    for (i = 0; i < n; i++) {
      var dot = svgEl("circle", { cx: xs[i], cy: y(0), r: Math.min(4, Math.max(2, step / 3)), class: "leaf",
                                  tabindex: i === order[0] ? "0" : "-1", role: "button", "data-index": String(i),
                                  "aria-label": "example " + i + ": " + displayToken(tokenText(N, N.tokens[i * N.width + N.before])) });
      var title = svgEl("title");
      title.textContent = "example " + i + ": " + JSON.stringify(tokenText(N, N.tokens[i * N.width + N.before]));
      dot.appendChild(title);
      leaves.push(dot);
      chart.appendChild(dot);
    }
    chart.addEventListener("click", function (e) {
      var leaf = e.target.closest && e.target.closest("circle.leaf");
      if (leaf) revealExample(Number(leaf.dataset.index));
    });
    chart.addEventListener("keydown", function (e) {
      var leaf = e.target.closest && e.target.closest("circle.leaf");
      if (!leaf) return;
      var at = order.indexOf(Number(leaf.dataset.index)), to = at;
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); revealExample(order[at]); return; }
      if (e.key === "ArrowRight") to = Math.min(n - 1, at + 1);
      else if (e.key === "ArrowLeft") to = Math.max(0, at - 1);
      else return;
      e.preventDefault();
      leaves[order[at]].setAttribute("tabindex", "-1");
      leaves[order[to]].setAttribute("tabindex", "0");
      leaves[order[to]].focus();
    });
    chart.addEventListener("focusin", function (e) {
      var leaf = e.target.closest && e.target.closest("circle.leaf");
      if (leaf) { highlightLeaf(Number(leaf.dataset.index), true); }
    });
    chart.addEventListener("focusout", function (e) {
      var leaf = e.target.closest && e.target.closest("circle.leaf");
      if (leaf) highlightLeaf(Number(leaf.dataset.index), false);
    });
    function highlightLeaf(i, on) { leaves[i].classList.toggle("hl", on); }
    var rep = new Int32Array(2 * n - 1);  // one leaf under each node, to read the node's cluster
    for (i = 0; i < n; i++) rep[i] = i;
    for (i = 0; i < n - 1; i++) rep[n + i] = rep[N.children[2 * i]];
    var cutLine = svgEl("line", { x1: left, x2: W - right, class: "cutline" });
    var cutLabel = svgEl("text", { x: W - right + 4, class: "label cut-label" });
    var configuredLabel = svgEl("text", { x: W - right + 4, y: y(N.threshold) + 4, class: "label" });
    configuredLabel.textContent = "config " + fmt(N.threshold, 3);
    chart.appendChild(cutLine);
    chart.appendChild(cutLabel);
    chart.appendChild(configuredLabel);
    box.appendChild(chart);

    this.highlight = highlightLeaf;
    this.cut = function (t) {
      var labels = Math.abs(t - N.threshold) < 1e-9 ? N.labels : fcluster(N.children, N.distance, n, t);
      for (var i = 0; i < n - 1; i++) setColour(links[i], md[i] <= t ? labels[rep[n + i]] : null);
      for (i = 0; i < n; i++) setColour(leaves[i], labels[i]);
      cutLine.setAttribute("y1", y(t));
      cutLine.setAttribute("y2", y(t));
      cutLabel.setAttribute("y", y(t) + 4);
      cutLabel.textContent = "cut " + fmt(t, 3);
      var same = Math.abs(t - N.threshold) < 1e-9;
      configuredLabel.style.display = same ? "none" : "";
      configured.style.display = same ? "none" : "";
      var k = 0;
      for (i = 0; i < n; i++) k = Math.max(k, labels[i] + 1);
      onCut(labels, k, t);
    };
  }

  // ------------------------------------------------------------------------------------------------ citation

  /* The same escaping and text as builder.render.pages.bibtex (tests compare the two). */
  function bibtexEscape(text) {
    return String(text).replace(/[\\{}%&$#_^~]/g, function (c) {
      return c === "\\" ? "\\textbackslash{}" : c === "^" ? "\\^{}" : c === "~" ? "\\~{}" : "\\" + c;
    });
  }

  /* A URL as \url's argument, as builder.render.pages.url_argument: `#` and `%` escaped with a backslash (which
   * \url drops; percent-encoding them would name another URL). */
  function urlArgument(url) { return url.replace(/[%#]/g, "\\$&"); }

  /* cite: {key, author, title, url, release, data (the cited file's path from the site root), sha256}. */
  function bibtex(cite, prov) {
    var note = "Model " + prov.model + " (revision " + prov.model_revision + "); dataset " + prov.dataset + ", " +
      prov.n_sequences + " sequences, " + prov.n_tokens + " tokens; threshold " + prov.threshold + "; code " +
      prov.code_version + "; config " + prov.config_hash;
    return "@misc{" + cite.key + ",\n  author = {" + bibtexEscape(cite.author) + "},\n" +
      "  title = {{Neuron Atlas}: " + bibtexEscape(cite.title) + "},\n" +
      "  howpublished = {\\url{" + urlArgument(cite.url) + "}},\n" +
      "  note = {" + bibtexEscape(note) + "; release " + cite.release + "; data " + bibtexEscape(cite.data) +
      " sha256 " + cite.sha256 + "},\n  year = {" + bibtexEscape(prov.build_date.slice(0, 4)) + "},\n" +
      "  date = {" + bibtexEscape(prov.build_date) + "}\n}\n";
  }

  var UNRELEASED = "unreleased";  // what the stamped regions say in a working build (builder.render.pages.UNSTAMPED)

  /* The release this page belongs to: the text of its stamped region <!--atlas:release-->…<!--/atlas:release-->,
   * which `atlas release` replaces by the release id (builder/release.py). */
  function pageRelease() {
    var walker = document.createTreeWalker(document.body, NodeFilter.SHOW_COMMENT);
    for (var node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.data === "atlas:release") return node.nextSibling ? node.nextSibling.textContent : UNRELEASED;
    }
    return UNRELEASED;
  }
  Atlas.pageRelease = pageRelease;

  /* A unit page's citation from its footer line (author, title, URL and the sha256 of its neuron.json, as the
   * builder printed them) and its release: what bibtex() needs besides the key. */
  function unitCitation(path) {
    var line = document.querySelector("footer .cite-line");
    var part = function (name) { var node = line && line.querySelector("." + name); return node ? node.textContent : ""; };
    var sha = /data sha256 ([0-9a-f]{64})/.exec(line ? line.textContent : "");
    return { author: part("cite-author"), title: part("cite-title"), url: part("cite-url"), release: pageRelease(),
             data: path + "neuron.json", sha256: sha ? sha[1] : "" };
  }

  /* The unit's direct logit effects: the tokens its output direction promotes and suppresses most. */
  function renderLogits(N) {
    var box = document.getElementById("logits");
    if (!box) return;
    [["top", "Promoted"], ["bottom", "Suppressed"]].forEach(function (side) {
      var column = el("div"), list = el("ol");
      N.raw.logits[side[0]].forEach(function (entry) {
        var item = el("li");
        item.appendChild(el("code", null, displayToken(tokenText(N, entry[0]))));
        item.appendChild(document.createTextNode(" " + fmt(entry[1], 3)));
        list.appendChild(item);
      });
      column.appendChild(el("h3", null, side[1]));
      column.appendChild(list);
      box.appendChild(column);
    });
  }

  /* The BibTeX key of the page at `path`, as builder.render.pages.citation_key. */
  function citationKey(path) {
    return "neuronatlas:" + (path.replace(/^\/+|\/+$/g, "").replace(/\//g, ":").replace(/[^A-Za-z0-9:.-]/g, "-") ||
                             "index");
  }
  Atlas.citationKey = citationKey;

  /* A unit page's BibTeX, from its citation line, its path and the atlas's provenance. */
  function fillCitation(prov, path) {
    var cite = document.getElementById("cite");
    if (!cite || cite.textContent || !document.querySelector(".cite-line .cite-url")) return;
    cite.textContent = bibtex(Object.assign({ key: citationKey(path) }, unitCitation(path)), prov);
  }

  /* The controls that only work with this script, added by it: the dendrogram's cut slider, the colour toggle and
   * the order of the examples (the page as served holds no dead controls). */
  function addControls(N) {
    var box = document.getElementById("dendro"), legend = document.getElementById("legend");
    if (box && N.n > 1) {
      var maxDistance = N.distance.length ? Math.max.apply(null, Array.from(N.distance)) : 0;
      var cutMax = Math.max(1, Math.ceil(maxDistance * CUT_STEPS_PER_UNIT) / CUT_STEPS_PER_UNIT);
      var threshold = String(N.threshold), k = N.raw.clusters.length;
      var cut = el("p", { class: "cut" });
      cut.appendChild(el("label", { for: "cut" }, "Cut at distance"));
      cut.appendChild(document.createTextNode(" "));
      cut.appendChild(el("input", { type: "range", id: "cut", min: "0", max: String(cutMax), step: "0.005",
                                    value: threshold }));
      cut.appendChild(document.createTextNode(" "));
      cut.appendChild(el("output", { id: "cut-out", for: "cut" }, threshold));
      cut.appendChild(document.createTextNode(" "));
      cut.appendChild(el("span", { id: "cut-k" }, k + (k === 1 ? " cluster" : " clusters")));
      cut.appendChild(document.createTextNode(" "));
      var reset = cut.appendChild(el("button", { type: "button", id: "cut-reset" }, "Back to " + threshold));
      reset.hidden = true;
      box.after(cut);
      cut.after(el("p", { class: "caption" }, "Leaves are examples (click or focus one to jump to it); the dashed " +
        "line is the cut (configured: " + threshold + "). Colours: the " + COLOURED + " largest clusters; grey: the rest."));
    }
    if (legend) {
      var tools = el("div", { class: "tools" });
      tools.appendChild(el("button", { type: "button", id: "imp-all", "aria-pressed": "false" }, "Colour by importance"));
      tools.appendChild(document.createTextNode(" "));
      var label = tools.appendChild(el("label", null, "Order "));
      var select = label.appendChild(el("select", { id: "order" }));
      select.appendChild(el("option", { value: "corpus" }, "central first, then corpus order"));
      select.appendChild(el("option", { value: "activation" }, "by activation"));
      legend.before(tools);
    }
  }

  // ------------------------------------------------------------------------------------------------ reproduce

  /* The placeholders of a reproduce template (builder/render/reproduce.py PLACEHOLDERS) replaced literally. */
  function fillTemplate(template, values) {
    return Object.keys(values).reduce(function (text, name) { return text.split(name).join(values[name]); }, template);
  }
  Atlas.fillTemplate = fillTemplate;

  /* "Reproduce this": the unit's set's script template (common.json `reproduce`) filled for the central example of
   * its first feature (from the sidecar), reading the bulk data of the page's release from where
   * releases/index.json (written by `atlas release`) says it is: published at release_url, or in the folder where
   * the reader extracted the release archive. The script takes the atlas's exact activation from the bulk data too.
   * A working build has no bulk data, so there the block says that it comes with a release. */
  function renderReproduce(N, common) {
    var template = (common.reproduce || {})[N.raw.set], features = document.getElementById("features");
    if (!template || !features) return;
    var details = el("details", { id: "reproduce" }), release = pageRelease();
    details.appendChild(el("summary", null, "Reproduce this"));
    features.after(details);  // below the features, beside the example it recomputes
    if (!N.raw.clusters.length) {
      details.appendChild(el("p", null, "This unit has no examples, so there is no activation to recompute."));
      return;
    }
    if (release === UNRELEASED) {
      details.appendChild(el("p", null, "A script here recomputes this unit's activation on an example from the " +
        "model and the example's whole sequence, which only the atlas's bulk data holds. The bulk data comes with a " +
        "release (atlas release); this page is from a working build, not yet released."));
      return;
    }
    var central = N.raw.clusters[0].central;
    var values = { __UNIT__: String(N.raw.neuron), __SEQUENCE__: String(N.seq[central]),
                   __POSITION__: String(N.pos[central]) };
    // The embedded model and SAEs load through the package that built the atlas (builder/render/reproduce.py).
    var needs = "pandas, pyarrow, torch and transformer-lens" + (/^from builder\./m.test(template) ?
      ", and the neuron-atlas package (the code that built this atlas: pip install it from its repository)" : "");
    details.appendChild(el("p", { class: "caption" }, "Recomputes the activation of feature F0's central example " +
      "(sequence " + values.__SEQUENCE__ + ", position " + values.__POSITION__ + ") from the model and the bulk " +
      "data of release " + release + ", and prints it beside the atlas's exact value. It needs " + needs + "."));
    var where = details.appendChild(el("p", { class: "caption", id: "reproduce-where" }));
    var pre = el("pre", { class: "script", id: "reproduce-script", tabindex: "0" });
    details.appendChild(pre);
    addCopyButton(pre, "Copy script");
    var filling = null;
    details.addEventListener("toggle", function () {
      if (filling || !details.open) return;
      filling = loadData("releases", modelRoot() + "../releases/index.json").then(function (index) {
        var entry = index.releases.filter(function (r) { return r.id === release; })[0];
        if (!entry) throw new Error("release " + release + " is not listed in releases/index.json");
        values.__BULK__ = entry.bulk;
        // Without release_url the archive is published by the atlas's authors, not on this site.
        where.textContent = /^https?:\/\//.test(entry.bulk) ?
          "It reads the bulk files from " + entry.bulk + "; the whole release is the archive " + entry.archive + "." :
          "Run it in the folder where you extracted " + entry.archive + ", the release's archive: it reads the " +
          "bulk files from " + entry.bulk + ". The archive is not on this site: get it where the atlas's authors " +
          "deposited it (a DOI, release assets).";
        pre.textContent = fillTemplate(template, values);
      }).catch(function (error) {
        details.appendChild(el("p", { class: "error" }, "Could not fill the script: " + error.message));
      });
    });
  }

  // ------------------------------------------------------------------------------------------------ pages

  function cutFromLocation() {
    var m = /[#&]cut=([0-9.]+)/.exec(window.location.hash);
    return m ? Number(m[1]) : null;
  }

  async function initNeuron() {
    var loaded = await Promise.all([loadData("neuron", "neuron.json"),
                                    loadData("common", modelRoot() + "data/common.json")]);
    var raw = loaded[0], common = loaded[1];
    Atlas.common = common;
    fillCitation(common.provenance, raw.path);
    // Each metric's definition as its tooltip; the metric is named by its link to the method page (#m-<metric>).
    document.querySelectorAll("dl.metrics a[href*='#m-']").forEach(function (link) {
      var text = (common.metrics || {})[link.hash.slice(3)];
      if (text) link.parentNode.parentNode.title = text;
    });
    var N = await decodeNeuron(raw, loaded[1].tokens);
    Atlas.neuron = N;
    view.labels = N.labels;
    drawHistogram(document.getElementById("hist"), histogramOf(raw.histogram, loaded[1].histogram_edges),
                  raw.max_activation, common.provenance.threshold);
    renderStatic(N);
    finishSections(common.provenance);
    renderReproduce(N, common);
    renderIntervals(N);
    renderLogits(N);
    renderLegend();
    addControls(N);
    var box = document.getElementById("dendro"), slider = document.getElementById("cut");
    if (box && slider && N.n > 1) {
      var out = document.getElementById("cut-out"), kOut = document.getElementById("cut-k");
      var tree = new Dendrogram(box, N, function (labels, k, t) {
        out.textContent = fmt(t, 3);
        kOut.textContent = k + (k === 1 ? " cluster" : " clusters") + (Math.abs(t - N.threshold) < 1e-9 ? "" :
          " (re-cut; the features F0\u2026 are at " + fmt(N.threshold, 3) + ")");
        showCut(N, labels, t);
      });
      view.tree = tree;
      slider.addEventListener("input", function () { tree.cut(Number(slider.value)); });
      var reset = document.getElementById("cut-reset");
      if (reset) reset.addEventListener("click", function () { slider.value = String(N.threshold); tree.cut(N.threshold); });
      var wanted = cutFromLocation();
      if (wanted !== null && isFinite(wanted) && wanted >= 0) {
        slider.value = String(Math.min(Number(slider.max), wanted));
        tree.cut(Math.min(Number(slider.max), wanted));
      } else {
        tree.cut(N.threshold);
      }
      Atlas.dendrogram = tree;
      window.addEventListener("hashchange", function () {
        var t = cutFromLocation();
        if (t !== null && t !== view.cut) { slider.value = String(t); tree.cut(t); }
      });
    }
    var all = document.getElementById("imp-all");
    if (all) {
      all.addEventListener("click", function () {
        var on = all.getAttribute("aria-pressed") !== "true";
        view.byImportance = on;
        all.setAttribute("aria-pressed", on ? "true" : "false");
        all.textContent = on ? "Colour by activation" : "Colour by importance";
        document.querySelectorAll(".example").forEach(function (card) { paintExample(card, on); });
      });
    }
    var orderSelect = document.getElementById("order");
    if (orderSelect) {
      orderSelect.addEventListener("change", function () {
        view.order = orderSelect.value;
        renderStatic(N);
        if (view.cut !== null && Math.abs(view.cut - N.threshold) > 1e-9) renderRecut(N, groupsOf(N, view.labels, false));
      });
    }
    window.addEventListener("hashchange", revealFeature);
    revealFeature();
    document.body.classList.add("ready");
  }

  /* The 404 page: a feature's former address (…/N<unit>/F<k>/) goes to its section of the unit's page. */
  function redirectFeature() {
    var m = /^(.*\/N\d+\/)F(\d+)\/(?:index\.html)?$/.exec(window.location.pathname);
    if (m) window.location.replace(m[1] + "#F" + m[2]);
  }

  /* The page's hash as parameters (#q=…&sort=…). */
  function hashParams() {
    return new URLSearchParams(window.location.hash.replace(/^#/, ""));
  }

  /* "L3 N42", "l3n42", "3/42", "3 42", "layer 3 neuron 42" -> [3, 42]; anything else -> null. */
  function parseNeuron(query) {
    var m = /^\s*(?:l(?:ayer)?\s*)?(\d+)\s*(?:[/:.,]\s*|\s+)(?:n(?:euron)?\s*)?(\d+)\s*$/i.exec(query) ||
            /^\s*l(?:ayer)?\s*(\d+)\s*n(?:euron)?\s*(\d+)\s*$/i.exec(query);
    return m ? [Number(m[1]), Number(m[2])] : null;
  }
  Atlas.parseNeuron = parseNeuron;

  function search(query) {
    var results = document.getElementById("results");
    // "<set slug> N<unit>" (e.g. "res-jb-6 N42") goes to that unit of any set.
    var named = /^\s*([A-Za-z0-9_.-]+)\s+N?(\d+)\s*$/.exec(query);
    if (named) {
      var wanted = named[1].toLowerCase(), number = Number(named[2]);
      var chosen = pageIndex().sets.filter(function (s) { return s.slug.toLowerCase() === wanted; })[0];
      if (chosen && number < chosen.size) { window.location.href = unitHref(chosen, number); return; }
    }
    var found = parseNeuron(query);
    if (found) {
      var atlas = pageIndex(), set = atlas.byKey.get("L" + found[0]);
      if (set && found[1] < set.size) { window.location.href = unitHref(set, found[1]); return; }
      var message = "No neuron L" + found[0] + " N" + found[1] + " in this atlas (layers " +
        atlas.sets.map(function (s) { return s.layer; }).join(", ") +
        ", neurons 0\u2013" + (Math.max.apply(null, atlas.sets.map(function (s) { return s.size; })) - 1) + ").";
      if (results) { results.textContent = message; return; }
    }
    if (query.trim() === "") return;
    if (results && body().kind === "model") {
      Atlas.wordSearch(query, results);
      var params = hashParams();
      params.set("q", query);
      try { window.history.replaceState(null, "", "#" + params.toString()); } catch (e) { /* file:// */ }
      return;
    }
    window.location.href = modelRoot() + "index.html#q=" + encodeURIComponent(query);
  }
  Atlas.search = search;

  /* A random unit, from the MLP layers when the atlas has any: an SAE's latents that never fired have no page, and
   * which they are is only in neurons.json (too large to fetch for this). */
  function randomNeuron() {
    var atlas = pageIndex();
    var pool = atlas.sets.filter(function (s) { return s.kind === "mlp"; });
    if (!pool.length) pool = atlas.sets;
    var total = pool.reduce(function (sum, s) { return sum + s.size; }, 0);
    if (!total) return;
    var pick = Math.floor(Math.random() * total), i = 0;
    while (pick >= pool[i].size) { pick -= pool[i].size; i++; }
    window.location.href = unitHref(pool[i], pick);
  }

  function queryFromLocation() {
    var hash = hashParams().get("q");
    var search = /[?&]q=([^&]*)/.exec(window.location.search);
    if (hash !== null) return hash;
    if (!search) return null;
    try { return decodeURIComponent(search[1].replace(/\+/g, " ")); } catch (e) { return null; }
  }

  var KEYS = [["/", "focus the search box"], ["j / n", "next neuron"],
              ["k / p", "previous neuron"], ["r", "a random neuron"],
              ["?", "show or hide this list"], ["Esc", "leave the search box, close this list"]];

  function toggleKeys() {
    var box = document.getElementById("keys-help");
    if (box) { box.remove(); return; }
    box = el("div", { id: "keys-help", role: "dialog", "aria-label": "Keyboard shortcuts", tabindex: "-1" });
    box.appendChild(el("h2", null, "Keyboard shortcuts"));
    var list = el("dl");
    KEYS.forEach(function (k) { list.appendChild(el("dt", null, k[0])); list.appendChild(el("dd", null, k[1])); });
    box.appendChild(list);
    var close = el("button", { type: "button" }, "Close");
    close.addEventListener("click", function () { box.remove(); });
    box.appendChild(close);
    document.body.appendChild(box);
    box.focus();
  }
  Atlas.toggleKeys = toggleKeys;

  // ------------------------------------------------------------------------------------------------ chrome

  /* A button after `pre` that copies its text: the clipboard API, else a selection and execCommand. */
  function addCopyButton(pre, label) {
    var copy = el("button", { type: "button", class: "copy" }, label);
    copy.addEventListener("click", function () {
      var done = function () { copy.textContent = "Copied"; setTimeout(function () { copy.textContent = label; }, 1500); };
      var fallback = function () {
        var range = document.createRange();
        range.selectNodeContents(pre);
        var selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        try { document.execCommand("copy"); done(); } catch (e) { copy.textContent = "Press Ctrl+C"; }
      };
      if (navigator.clipboard && navigator.clipboard.writeText) navigator.clipboard.writeText(pre.textContent).then(done, fallback);
      else fallback();
    });
    pre.after(copy);
    return copy;
  }


  function effectiveTheme() {
    var set = document.documentElement.getAttribute("data-theme");
    if (set) return set;
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  function initChrome() {
    var header = document.querySelector("header.top");
    if (header) {
      var form = el("form", { class: "search", role: "search" });
      var input = el("input", { type: "search", id: "q", name: "q", placeholder: "L3 N42, 3/42 or words",
                                "aria-label": "Search neurons (L3 N42, 3/42) or words", autocomplete: "off" });
      form.appendChild(input);
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        search(input.value);
      });
      header.appendChild(form);
      var button = el("button", { type: "button", id: "theme" });
      var label = function () {
        var dark = effectiveTheme() === "dark";
        button.textContent = dark ? "\u2600 Light" : "\u263e Dark";
        button.setAttribute("aria-label", dark ? "Switch to light mode" : "Switch to dark mode");
      };
      button.addEventListener("click", function () {
        var next = effectiveTheme() === "dark" ? "light" : "dark";
        document.documentElement.setAttribute("data-theme", next);
        try { window.localStorage.setItem(THEME_KEY, next); } catch (e) { /* storage may be disabled */ }
        label();
      });
      label();
      header.appendChild(button);
    }
    var cite = document.getElementById("cite");
    if (cite) addCopyButton(cite, "Copy BibTeX");
    document.querySelectorAll("a.random").forEach(function (a) {
      a.addEventListener("click", function (e) { e.preventDefault(); randomNeuron(); });
    });
  }

  document.addEventListener("keydown", function (e) {
    if (e.defaultPrevented || e.ctrlKey || e.metaKey || e.altKey) return;
    var target = e.target;
    if (target && target.closest && target.closest("input, textarea, select, [contenteditable]")) {
      if (e.key === "Escape" && target.blur) target.blur();
      return;
    }
    var link;
    switch (e.key) {
      case "?":
        e.preventDefault();
        toggleKeys();
        break;
      case "Escape":
        var help = document.getElementById("keys-help");
        if (help) help.remove();
        break;
      case "/":
        var q = document.getElementById("q");
        if (q) { e.preventDefault(); q.focus(); q.select(); }
        break;
      case "j": case "n":
        link = document.querySelector("a[rel=next]");
        if (link) { e.preventDefault(); window.location.href = link.href; }
        break;
      case "k": case "p":
        link = document.querySelector("a[rel=prev]");
        if (link) { e.preventDefault(); window.location.href = link.href; }
        break;
      case "r":
        e.preventDefault();
        randomNeuron();
        break;
    }
  });

  async function init() {
    var kind = body().kind;
    if (kind === "404") redirectFeature();
    initChrome();
    try {
      if (kind === "neuron") await initNeuron();
      if (kind === "model") {
        if (Atlas.initModel) await Atlas.initModel();
        var query = queryFromLocation();
        if (query) { document.getElementById("q").value = query; search(query); }
      }
    } finally {
      document.documentElement.setAttribute("data-ready", "true");
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    init().catch(function (error) {
      var main = document.querySelector("main");
      if (main) main.prepend(el("p", { class: "error" }, "Could not draw this page: " + error.message));
      throw error;
    });
  });
})();
