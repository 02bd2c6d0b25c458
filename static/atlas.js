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
  var PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#17becf", "#bcbd22", "#8c564b"];
  var ABOVE_CUT = "#9aa0a6";
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
      var entry = { key: s.key, slug: s.slug || s.key, layer: s.layer, size: s.size, offset: offset };
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

  /* The index of this page's atlas, from <body data-sets="key:slug:layer:size,...">. */
  function pageIndex() {
    return new SubjectIndex((body().sets || "").split(",").filter(function (s) { return s !== ""; })
      .map(function (entry) {
        var parts = entry.split(":");
        return { key: parts[0], slug: parts[1], layer: Number(parts[2]), size: Number(parts[3]) };
      }));
  }

  function unitHref(set, unit, feature) {
    return modelRoot() + set.slug + "/N" + unit + "/" + (feature === undefined ? "" : "F" + feature + "/") +
      "index.html";
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
        if (!data(key)) throw new Error(url + ".js did not define " + key);
        return data(key);
      });
    } else {
      loaded = fetch(url).then(function (response) {
        if (!response.ok) throw new Error("cannot load " + url + " (HTTP " + response.status + ")");
        return response.json();
      }).then(function (document) {
        (window.ATLAS_DATA = window.ATLAS_DATA || {})[key] = document;
        return document;
      });
    }
    return loaded;
  }
  Atlas.loadData = loadData;

  function loadScript(src) {
    return new Promise(function (resolve, reject) {
      var script = el("script", { src: src });
      script.onload = resolve;
      script.onerror = function () { reject(new Error("cannot load " + src)); };
      document.head.appendChild(script);
    });
  }

  // ------------------------------------------------------------------------------------------------ decoding

  var TYPES = { u1: Uint8Array, u2: Uint16Array, u4: Uint32Array, i4: Int32Array, f4: Float32Array };

  /* base64 -> zlib-inflated bytes -> typed array (little-endian), as written by builder.render.pack. */
  async function unpack(b64, dtype) {
    var binary = atob(b64);
    var bytes = new Uint8Array(binary.length);
    for (var i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
    var stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    var buffer = await new Response(stream).arrayBuffer();
    var Type = TYPES[dtype];
    return new Type(buffer, 0, buffer.byteLength / Type.BYTES_PER_ELEMENT);
  }
  Atlas.unpack = unpack;

  async function decodeNeuron(raw) {
    var ex = raw.examples;
    var width = raw.window.before + 1 + raw.window.after;
    var parts = await Promise.all([
      unpack(ex.tokens, ex.token_dtype), unpack(ex.activation, "u1"), unpack(ex.importance, "u1"),
      unpack(ex.sequence, "u4"), unpack(ex.position, "u4"), unpack(ex.cluster, "u4"),
      unpack(raw.linkage.children, "u4"), unpack(raw.linkage.distance, "f4"), unpack(raw.neighbours, "i4")]);
    return {
      raw: raw, n: ex.count, width: width, before: raw.window.before, tokens: parts[0], act: parts[1],
      imp: parts[2], seq: parts[3], pos: parts[4], labels: Int32Array.from(parts[5]), children: parts[6],
      distance: parts[7], neighbours: parts[8], lo: ex.activation_range[0], hi: ex.activation_range[1],
      sentinel: ex.token_dtype === "u2" ? 0xffff : 0xffffffff, threshold: raw.cluster_threshold
    };
  }
  Atlas.decodeNeuron = decodeNeuron;

  function activation(N, code) { return code === MISSING ? NaN : N.lo + code / LEVELS * (N.hi - N.lo); }
  function importance(code) { return code === MISSING ? NaN : code / LEVELS; }

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

  function colour(k) { return PALETTE[k % PALETTE.length]; }

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

  function renderExample(N, vocab, index) {
    var card = el("div", { class: "example", "data-index": String(index) });
    var head = el("div", { class: "ex-head" });
    head.appendChild(el("span", { class: "chip", "aria-hidden": "true" }));
    var center = N.act[index * N.width + N.before];
    head.appendChild(el("span", { class: "ex-meta" }, "max " + fmt(activation(N, center), 3) + " \u00b7 sequence " +
      N.seq[index] + ", position " + N.pos[index]));
    var toggle = el("button", { type: "button", class: "imp-toggle", "aria-pressed": "false" }, "importance");
    toggle.addEventListener("click", function () {
      paintExample(card, toggle.getAttribute("aria-pressed") !== "true");
    });
    head.appendChild(toggle);
    card.appendChild(head);
    var line = el("p", { class: "toks", dir: "ltr" });
    for (var c = 0; c < N.width; c++) {
      var id = N.tokens[index * N.width + c];
      if (id === N.sentinel) continue;
      var raw = id < vocab.length ? vocab[id] : "<" + id + ">";
      var span = el("span", { class: c === N.before ? "tok max" : "tok", tabindex: c === N.before ? "0" : "-1" },
        displayToken(raw));
      span._raw = raw;
      span._act = activation(N, N.act[index * N.width + c]);
      span._imp = c <= N.before ? importance(N.imp[index * (N.before + 1) + c]) : NaN;
      span._offset = c - N.before;
      span._hi = N.hi;
      span.setAttribute("aria-label", displayToken(raw) + ", activation " + fmt(span._act, 3));
      paint(span, false);
      line.appendChild(span);
    }
    line.addEventListener("keydown", tokenKeys);
    card.appendChild(line);
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

  function clusterOrder(N, k) {
    var central = N.raw.clusters[k].central, order = [central];
    for (var i = 0; i < N.n; i++) if (N.labels[i] === k && i !== central) order.push(i);
    return order;
  }

  function renderCluster(section, N, vocab, k, shown) {
    var box = el("div", { class: "examples" });
    section.appendChild(box);
    var order = clusterOrder(N, k);
    var append = function (from, to) {
      for (var j = from; j < to; j++) box.appendChild(renderExample(N, vocab, order[j]));
    };
    append(0, Math.min(order.length, shown));
    if (order.length > shown) {
      var more = el("button", { type: "button", class: "more" }, "Show " + (order.length - shown) + " more example" +
        (order.length - shown === 1 ? "" : "s"));
      more.addEventListener("click", function () {
        append(shown, order.length);
        more.remove();
        recolourChips();
      });
      box.after(more);
    }
    section.querySelectorAll(".ex-static, .ex-meta").forEach(function (node) {
      if (!box.contains(node)) node.classList.add("js-hidden");
    });
  }

  function renderSimilar(section, N, k, open) {
    var rows = [];
    for (var i = 0; i < N.neighbours.length; i += 5) if (N.neighbours[i] === k) rows.push(i);
    var box = el("div", { class: "similar" });
    section.appendChild(box);
    var details = el("details", open ? { open: "" } : {});
    details.appendChild(el("summary", null, "Similar features (" + rows.length + ")"));
    if (!rows.length) details.appendChild(el("p", null, "No feature above the similarity threshold."));
    var list = el("ol", { class: "similar-list" });
    rows.forEach(function (i) {
      var nb = N.neighbours;
      var li = el("li");
      var other = pageIndex().ofLayer(nb[i + 1]);
      if (!other) return;
      li.appendChild(el("a", { href: unitHref(other, nb[i + 2], nb[i + 3]) },
        other.slug + " N" + nb[i + 2] + " F" + nb[i + 3]));
      li.appendChild(el("span", { class: "sim" }, " similarity " + (nb[i + 4] / 10000).toFixed(2)));
      list.appendChild(li);
    });
    if (rows.length) details.appendChild(list);
    box.appendChild(details);
  }

  // ------------------------------------------------------------------------------------------------ charts

  function drawHistogram(box, hist, maxActivation, threshold) {
    var counts = hist.counts, edges = hist.edges;
    if (!box || !counts.length) { if (box) box.textContent = "No activations recorded."; return; }
    var W = 600, H = 170, left = 36, bottom = 24, top = 8;
    var chart = svgEl("svg", { viewBox: "0 0 " + W + " " + H, class: "hist", "aria-hidden": "true" });
    var peak = Math.log10(Math.max.apply(null, counts) + 1) || 1;
    var bw = (W - left - 4) / counts.length;
    counts.forEach(function (count, i) {
      var h = Math.log10(count + 1) / peak * (H - bottom - top);
      var bar = svgEl("rect", { x: left + i * bw, y: H - bottom - h, width: Math.max(1, bw - 1), height: h,
                                class: "bar" });
      var title = svgEl("title");
      title.textContent = "(" + (edges[i] === null ? "\u2212\u221e" : fmt(edges[i], 3)) + ", " +
        (edges[i + 1] === null ? "\u221e" : fmt(edges[i + 1], 3)) + "]: " + count + " tokens";
      bar.appendChild(title);
      chart.appendChild(bar);
    });
    function xOf(value) {
      for (var i = 0; i < counts.length; i++) {
        var upper = edges[i + 1] === null ? Infinity : edges[i + 1];
        if (value <= upper) return left + (i + 0.5) * bw;
      }
      return W - 4;
    }
    var axis = svgEl("line", { x1: left, x2: W - 4, y1: H - bottom, y2: H - bottom, class: "axis" });
    chart.appendChild(axis);
    [[0, "start"], [Math.floor(counts.length / 2), "middle"], [counts.length, "end"]].forEach(function (p) {
      var value = edges[p[0]];
      if (value === null || value === undefined) return;
      var label = svgEl("text", { x: left + p[0] * bw, y: H - 6, "text-anchor": p[1], class: "label" });
      label.textContent = fmt(value, 2);
      chart.appendChild(label);
    });
    var yl = svgEl("text", { x: 2, y: top + 10, class: "label" });
    yl.textContent = "log n";
    chart.appendChild(yl);
    if (maxActivation > 0 && threshold) {
      var x = xOf(maxActivation * threshold);
      chart.appendChild(svgEl("line", { x1: x, x2: x, y1: top, y2: H - bottom, class: "marker" }));
      var t = svgEl("text", { x: x - 3, y: top + 10, "text-anchor": "end", class: "label" });
      t.textContent = "examples \u2265 " + fmt(maxActivation * threshold, 3);
      chart.appendChild(t);
    }
    box.appendChild(chart);
    box.appendChild(el("p", { class: "caption" }, "Activations over every token of the dataset (log counts; bins " +
      "grow geometrically away from 0)."));
  }

  function Dendrogram(box, N, onCut) {
    var n = N.n, W = 900, H = 190, left = 34, bottom = 12, top = 8;
    var md = maxDistances(N.children, N.distance, n);
    var ymax = Math.max(Number(document.getElementById("cut").max) || 1, md.length ? md[md.length - 1] : 0) * 1.02;
    var y = function (d) { return top + (1 - d / ymax) * (H - top - bottom); };
    var xs = new Float64Array(2 * n - 1), heights = new Float64Array(2 * n - 1), leafRank = new Int32Array(n);
    // Leaf order as scipy's dendrogram: depth-first from the root, left child first.
    var order = [], stack = [2 * n - 2];
    while (stack.length) {
      var node = stack.pop();
      if (node < n) { order.push(node); continue; }
      stack.push(N.children[2 * (node - n) + 1]);
      stack.push(N.children[2 * (node - n)]);
    }
    var step = (W - left - 6) / n;
    order.forEach(function (leaf, r) { leafRank[leaf] = r; xs[leaf] = left + (r + 0.5) * step; });
    for (var i = 0; i < n - 1; i++) {
      xs[n + i] = (xs[N.children[2 * i]] + xs[N.children[2 * i + 1]]) / 2;
      heights[n + i] = N.distance[i];
    }
    var chart = svgEl("svg", { viewBox: "0 0 " + W + " " + H, class: "dendro" });
    [0, ymax / 2, ymax].forEach(function (d) {
      var label = svgEl("text", { x: 2, y: y(d) + 4, class: "label" });
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
    var leaves = [];
    for (i = 0; i < n; i++) {
      var dot = svgEl("circle", { cx: xs[i], cy: y(0), r: Math.min(4, Math.max(1.5, step / 3)), class: "leaf" });
      var title = svgEl("title");
      var id = N.tokens[i * N.width + N.before];
      var vocab = (data("vocab") || {}).tokens || [];
      title.textContent = "example " + i + ": " + JSON.stringify(id < vocab.length ? vocab[id] : "<" + id + ">");
      dot.appendChild(title);
      leaves.push(dot);
      chart.appendChild(dot);
    }
    var rep = new Int32Array(2 * n - 1);  // one leaf under each node, to read the node's cluster
    for (i = 0; i < n; i++) rep[i] = i;
    for (i = 0; i < n - 1; i++) rep[n + i] = rep[N.children[2 * i]];
    var cutLine = svgEl("line", { x1: left, x2: W - 4, class: "cutline" });
    chart.appendChild(cutLine);
    box.appendChild(chart);

    this.cut = function (t) {
      var labels = Math.abs(t - N.threshold) < 1e-9 ? N.labels : fcluster(N.children, N.distance, n, t);
      for (var i = 0; i < n - 1; i++) links[i].style.stroke = md[i] <= t ? colour(labels[rep[n + i]]) : ABOVE_CUT;
      for (i = 0; i < n; i++) leaves[i].style.fill = colour(labels[i]);
      cutLine.setAttribute("y1", y(t));
      cutLine.setAttribute("y2", y(t));
      var k = 0;
      for (i = 0; i < n; i++) k = Math.max(k, labels[i] + 1);
      onCut(labels, k, t);
    };
  }

  var currentLabels = null;

  function recolourChips() {
    if (!currentLabels) return;
    document.querySelectorAll(".example").forEach(function (card) {
      var k = currentLabels[Number(card.dataset.index)];
      card.style.borderLeftColor = colour(k);
      var chip = card.querySelector(".chip");
      if (chip) { chip.style.backgroundColor = colour(k); chip.title = "cluster " + k + " at the current cut"; }
    });
  }

  // ------------------------------------------------------------------------------------------------ pages

  async function initNeuron() {
    var featureId = body().feature;
    var loaded = await Promise.all([loadData("neuron", featureId === undefined ? "neuron.json" : "../neuron.json"),
                                    loadData("vocab", modelRoot() + "data/vocab.json")]);
    var raw = loaded[0], vocab = loaded[1].tokens;
    var N = await decodeNeuron(raw);
    Atlas.neuron = N;
    currentLabels = N.labels;
    document.querySelectorAll("section.feature[id] h3").forEach(function (h) {
      var swatch = el("span", { class: "swatch", "aria-hidden": "true" });
      swatch.style.backgroundColor = colour(Number(h.parentNode.dataset.cluster));
      h.prepend(swatch);
    });
    drawHistogram(document.getElementById("hist"), raw.histogram, raw.max_activation, raw.provenance.threshold);
    document.querySelectorAll("section.feature").forEach(function (section) {
      var k = Number(section.dataset.cluster);
      renderCluster(section, N, vocab, k, featureId === undefined ? EXAMPLES_SHOWN : Infinity);
      renderSimilar(section, N, k, featureId !== undefined);
    });
    var box = document.getElementById("dendro"), slider = document.getElementById("cut");
    if (box && slider && N.n > 1) {
      var out = document.getElementById("cut-out"), kOut = document.getElementById("cut-k");
      var tree = new Dendrogram(box, N, function (labels, k, t) {
        currentLabels = labels;
        out.textContent = fmt(t, 3);
        kOut.textContent = k + (k === 1 ? " cluster" : " clusters") + (Math.abs(t - N.threshold) < 1e-9 ? "" :
          " (re-cut; feature pages use " + fmt(N.threshold, 3) + ")");
        recolourChips();
      });
      slider.addEventListener("input", function () { tree.cut(Number(slider.value)); });
      tree.cut(Number(slider.value));
      Atlas.dendrogram = tree;
    }
    recolourChips();
    var all = document.getElementById("imp-all");
    if (all) {
      all.addEventListener("click", function () {
        var on = all.getAttribute("aria-pressed") !== "true";
        all.setAttribute("aria-pressed", on ? "true" : "false");
        all.textContent = on ? "Colour by activation" : "Colour by importance";
        document.querySelectorAll(".example").forEach(function (card) { paintExample(card, on); });
      });
    }
    document.body.classList.add("ready");
  }

  // The model index: sortable, filterable, paged table of every neuron, and search.
  var PAGE = 50;

  async function initModel() {
    var tbody = document.querySelector("#neurons tbody");
    if (!tbody) return;
    var table = await loadData("neurons", "data/neurons.json");
    var cols = table.columns, index = new SubjectIndex(table.sets);
    var total = index.total;
    var state = { col: "row", dir: 1, page: 0 };
    var filters = { set: document.getElementById("f-set"), ex: document.getElementById("f-ex"),
                    k: document.getElementById("f-k"), share: document.getElementById("f-share") };
    function value(row, col) { return col === "row" ? row : cols[col][row]; }
    function rows() {
      var set = filters.set.value ? index.byKey.get(filters.set.value) : null, minEx = Number(filters.ex.value) || 0, minK = Number(filters.k.value) || 0;
      var maxShare = filters.share.value === "" ? 1 : Number(filters.share.value);
      var out = [];
      for (var r = 0; r < total; r++) {
        if (set && (r < set.offset || r >= set.offset + set.size)) continue;
        if (cols.n_examples[r] < minEx || cols.n_clusters[r] < minK) continue;
        var share = cols.largest_share[r];
        if (share !== null && share > maxShare + 1e-12) continue;
        out.push(r);
      }
      out.sort(function (a, b) {
        var x = value(a, state.col), y = value(b, state.col);
        if (x === null && y === null) return a - b;
        if (x === null) return 1;  // missing values last in either direction
        if (y === null) return -1;
        return (x - y) * state.dir || a - b;
      });
      return out;
    }
    function draw() {
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
        ["max_activation", "n_examples", "n_clusters", "largest_share", "mean_distance", "intra_distance",
         "inter_distance"].forEach(function (c) {
          tr.appendChild(el("td", null, c === "n_examples" || c === "n_clusters" ? String(cols[c][r]) : fmt(cols[c][r], 3)));
        });
        tbody.appendChild(tr);
      });
      document.getElementById("page-info").textContent = "page " + (state.page + 1) + " of " + pages + " \u00b7 " +
        list.length + " of " + total + " neurons";
      document.getElementById("page-prev").disabled = state.page === 0;
      document.getElementById("page-next").disabled = state.page >= pages - 1;
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
    draw();
  }

  /* "L3 N42", "l3n42", "3/42", "3 42", "layer 3 neuron 42" -> [3, 42]; anything else -> null. */
  function parseNeuron(query) {
    var m = /^\s*(?:l(?:ayer)?\s*)?(\d+)\s*(?:[/:.,]\s*|\s+)(?:n(?:euron)?\s*)?(\d+)\s*$/i.exec(query) ||
            /^\s*l(?:ayer)?\s*(\d+)\s*n(?:euron)?\s*(\d+)\s*$/i.exec(query);
    return m ? [Number(m[1]), Number(m[2])] : null;
  }
  Atlas.parseNeuron = parseNeuron;

  async function tokenSearch(query, results) {
    results.textContent = "Searching\u2026";
    try {
      await Promise.all([loadData("vocab", modelRoot() + "data/vocab.json"),
                         loadData("tokens", modelRoot() + "data/tokens.json")]);
    } catch (error) {
      results.textContent = "The token index could not be loaded.";
      return;
    }
    var vocab = data("vocab").tokens, index = data("tokens");
    var where = new Map(index.token_ids.map(function (id, i) { return [id, i]; }));
    var wanted = query.trim().toLowerCase();
    var exact = [], loose = [];
    for (var id = 0; id < vocab.length; id++) {
      if (!where.has(id)) continue;
      if (vocab[id] === query) exact.push(id);
      else if (vocab[id].trim().toLowerCase() === wanted) loose.push(id);
    }
    var ids = exact.concat(loose).slice(0, 20);
    results.textContent = "";
    if (!ids.length) {
      results.appendChild(el("p", null, "No neuron's features peak on a token matching " + JSON.stringify(query) + "."));
      return;
    }
    var units = new SubjectIndex(index.sets);
    ids.forEach(function (id) {
      var block = el("div", { class: "token-hit" });
      var neurons = index.rows[where.get(id)];
      block.appendChild(el("h3", null, "Token " + JSON.stringify(vocab[id]) + " (id " + id + "): " + neurons.length +
        " neuron" + (neurons.length === 1 ? "" : "s")));
      var list = el("ul", { class: "inline" });
      neurons.slice(0, 100).forEach(function (row) {
        var li = el("li");
        var at = units.unit(row);
        li.appendChild(el("a", { href: unitHref(at.set, at.unit) }, at.set.slug + " N" + at.unit));
        list.appendChild(li);
      });
      block.appendChild(list);
      results.appendChild(block);
    });
  }

  function search(query) {
    var found = parseNeuron(query);
    var results = document.getElementById("results");
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
      tokenSearch(query, results);
      try { window.history.replaceState(null, "", "#q=" + encodeURIComponent(query)); } catch (e) { /* file:// */ }
      return;
    }
    window.location.href = modelRoot() + "index.html#q=" + encodeURIComponent(query);
  }
  Atlas.search = search;

  function randomNeuron() {
    var atlas = pageIndex();
    if (!atlas.total) return;
    var at = atlas.unit(Math.floor(Math.random() * atlas.total));
    window.location.href = unitHref(at.set, at.unit);
  }

  function queryFromLocation() {
    var hash = /[#&]q=([^&]*)/.exec(window.location.hash);
    var search = /[?&]q=([^&]*)/.exec(window.location.search);
    var value = hash ? hash[1] : search ? search[1] : null;
    if (value === null) return null;
    try { return decodeURIComponent(value.replace(/\+/g, " ")); } catch (e) { return null; }
  }

  // ------------------------------------------------------------------------------------------------ chrome

  function effectiveTheme() {
    var set = document.documentElement.getAttribute("data-theme");
    if (set) return set;
    return window.matchMedia && window.matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light";
  }

  function initChrome() {
    var header = document.querySelector("header.top");
    if (header) {
      var form = el("form", { class: "search", role: "search" });
      var input = el("input", { type: "search", id: "q", name: "q", placeholder: "L3 N42, 3/42 or a token",
                                "aria-label": "Search neurons (L3 N42, 3/42) or tokens", autocomplete: "off" });
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
    if (cite) {
      var copy = el("button", { type: "button", class: "copy" }, "Copy BibTeX");
      copy.addEventListener("click", function () {
        var done = function () { copy.textContent = "Copied"; setTimeout(function () { copy.textContent = "Copy BibTeX"; }, 1500); };
        var fallback = function () {
          var range = document.createRange();
          range.selectNodeContents(cite);
          var selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          try { document.execCommand("copy"); done(); } catch (e) { copy.textContent = "Press Ctrl+C"; }
        };
        if (navigator.clipboard && navigator.clipboard.writeText) navigator.clipboard.writeText(cite.textContent).then(done, fallback);
        else fallback();
      });
      cite.after(copy);
    }
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
    initChrome();
    var kind = body().kind;
    try {
      if (kind === "neuron" || kind === "feature") await initNeuron();
      if (kind === "model") {
        await initModel();
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
