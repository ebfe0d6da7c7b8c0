/* gradviz page: draws the graph with vis-network and wires the controls.
 *
 * Plain JS, no other library. All data comes from JSON (the <script type="application/json">
 * blocks, or the server's api/ endpoints); every string from the file reaches the DOM
 * through textContent or canvas text, never innerHTML. The encoding below mirrors
 * gradviz/render.py; its scales and palette come from the page data, so they agree.
 */
(function () {
  "use strict";

  var ABSENT_BITS = 0xffffffff;
  var STATS = {  // gradviz.schema.STAT_SERIES, as the detail panel words them
    act_mean: "output mean", act_std: "output std", act_min: "output min",
    act_max: "output max", act_zero_frac: "zeros in output", dead_frac: "dead ReLU units",
    saturated_frac: "saturated units", noise_scale: "gradient noise scale (DDP)",
  };

  function $(id) { return document.getElementById(id); }
  function readJSON(id) { return JSON.parse($(id).textContent); }
  function el(tag, text, cls) {
    var e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  // Values travel as numbers, "NaN"/"Infinity"/"-Infinity" strings, or null (absent).
  function dec(v) {
    if (typeof v === "number") return v;
    if (v === "NaN") return NaN;
    if (v === "Infinity") return Infinity;
    if (v === "-Infinity") return -Infinity;
    return null;
  }
  function decList(a) { return (a || []).map(dec); }

  function fmt(x) {
    if (x === null || x === undefined) return "absent";
    if (Number.isNaN(x)) return "NaN";
    if (!Number.isFinite(x)) return x > 0 ? "Infinity" : "-Infinity";
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e-3 && a < 1e4) return String(Number(x.toPrecision(3)));
    return x.toExponential(2);
  }
  function fmtCount(n) { return Number(n).toLocaleString("en-US"); }

  function valueStatus(x) {
    if (x === null || x === undefined) return "absent";
    return Number.isFinite(x) ? "ok" : "nonfinite";
  }
  function nodeStatus(hasParams, g, a) {
    if (valueStatus(g) === "nonfinite" || valueStatus(a) === "nonfinite") return "nonfinite";
    return valueStatus(hasParams ? g : a);
  }
  function logScale(s) {
    return function (x) {
      if (x <= 0) return s.out_lo;
      var t = (Math.log10(x) - s.lo) / (s.hi - s.lo);
      return s.out_lo + Math.min(Math.max(t, 0), 1) * (s.out_hi - s.out_lo);
    };
  }
  function round3(x) { return Math.round(x * 1000) / 1000; }

  // ---- state ---------------------------------------------------------------------------

  var data = readJSON("gv-data");
  var state = {
    mode: data.mode,
    live: data.live,
    payload: data,
    run: data.run,
    revision: data.run.revision,
    threshold: data.threshold,
    thresholdMoved: false,  // the slider was moved: a new run's own threshold does not win
    index: data.run.steps.length - 1,
    shown: null,          // the values drawn now: {step, gradient_norm, activation_grad_norm, edges}
    shownStep: null,
    follow: true,         // at the last step: live updates move the view along
    selected: null,       // the layer shown in the details panel, or null
    selectedEdge: null,   // ... or the edge (its id, "a->b"), or null
    layers: Object.create(null),  // layer id -> history, fetched on demand
    view: data.run.view,  // the roll-up shown: {depth, expanded, options, auto}
    edgeColour: [],       // colour each edge is drawn in now: a threshold move updates only
                          // the edges whose colour changes
    token: 0,             // the latest step request: earlier answers are dropped
    graphPending: null,   // the latest graph (view) request: an earlier one waits for it
    asked: null,          // a view asked for and not drawn yet (see wantedView)
    ready: false,
    firstDrawn: null,     // performance.now() of the first frame drawn (benchmarks read it)
    errors: [],
  };

  var nodes = new vis.DataSet(readJSON("gv-nodes"));
  var edges = new vis.DataSet(readJSON("gv-edges"));
  var network = new vis.Network($("gv-network"), { nodes: nodes, edges: edges },
                                readJSON("gv-options"));
  network.once("afterDrawing", function () { state.firstDrawn = performance.now(); });

  function latestValues(run) {
    return {
      step: run.latest.step,
      gradient_norm: decList(run.latest.gradient_norm),
      activation_grad_norm: decList(run.latest.activation_grad_norm),
      edges: decList(run.latest.edges),
    };
  }

  // ---- encoding (mirrors gradviz/render.py) --------------------------------------------

  function severities() {
    var out = Object.create(null);  // keys are layer names: "__proto__" is a fine name
    state.run.findings.forEach(function (f) {
      f.layers.forEach(function (id) { if (!(id in out)) out[id] = f.severity; });
    });
    return out;
  }

  function nodeStyle(info, g, a, severity) {
    var P = state.payload.palette, small = state.payload.sizes.small;
    var scale = state.payload.scales.node, size = logScale(scale);
    var status = nodeStatus(info.has_params, g, a);
    var shape, sz, fill, border;
    if (!info.has_params) {
      shape = "diamond"; sz = small; fill = P.junction; border = "junction_border";
    } else {
      shape = info.kind === "group" ? "square" : "dot"; fill = P.layer; border = "layer_border";
      sz = (status === "ok" && g !== null) ? size(g) : scale.out_hi;
    }
    if (status === "absent") { sz = small; fill = P.absent_fill; border = "absent"; }
    else if (status === "nonfinite") { fill = P.nonfinite; border = "nonfinite_border"; }
    var bc = severity ? P[severity] : P[border];
    return {
      shape: shape,
      size: round3(sz),
      borderWidth: severity ? 4 : status === "nonfinite" ? 3 : 1.5,
      color: { background: fill, border: bc, highlight: { background: fill, border: "#000000" },
               hover: { background: fill, border: "#000000" } },
      shapeProperties: { borderDashes: status === "absent" ? [4, 3] : false },
    };
  }

  function edgeColour(x) {
    var P = state.payload.palette, status = valueStatus(x);
    if (status === "nonfinite") return P.nonfinite;
    if (status === "absent") return P.absent;
    return x > state.threshold ? P.above : P.below;
  }
  function colourObject(c) { return { color: c, highlight: c, hover: c, inherit: false }; }

  function edgeStyle(x) {
    var scale = state.payload.scales.edge, status = valueStatus(x), width, dashes;
    if (status === "nonfinite") { width = scale.out_hi; dashes = [8, 4]; }
    else if (status === "absent") { width = scale.out_lo; dashes = [2, 4]; }
    else { width = logScale(scale)(x); dashes = false; }
    return { width: round3(width), dashes: dashes, color: colourObject(edgeColour(x)) };
  }

  function nodeTitle(info, g, a, step) {
    var lines = [info.id, info.type + " · " + info.kind +
                 (info.param_count ? " · " + fmtCount(info.param_count) + " parameters" : "")];
    if (info.has_params) lines.push("gradient norm " + fmt(g));
    lines.push("activation gradient norm " + fmt(a));
    if (step !== null && step !== undefined) lines.push("step " + step);
    if (info.kind === "group") lines.push(expandHint());  // (as render.node_title)
    return lines.join("\n");
  }

  // an edge's norm, and on which side of the threshold it is (tooltip and details panel)
  function edgeNorm(x) {
    if (valueStatus(x) !== "ok") return fmt(x);
    return fmt(x) + (x > state.threshold ? " (above threshold)" : " (at or below threshold)");
  }

  function edgeTitle(e, x) {
    var lines = [e.source + " → " + e.target];
    if (e.via.length) lines.push("via " + e.via.join(", "));
    lines.push("gradient norm " + edgeNorm(x));
    return lines.join("\n");
  }

  function restyleNodes() {
    var v = state.shown, sev = severities();
    nodes.update(state.run.nodes.map(function (info, i) {
      var g = v.gradient_norm[i], a = v.activation_grad_norm[i];
      var item = nodeStyle(info, g, a, sev[info.id]);
      item.id = "n" + i;
      item.title = nodeTitle(info, g, a, v.step);
      return item;
    }));
  }

  // A threshold move changes edge colours and titles only. Through the DataSet, vis-network
  // re-parses every option of each updated edge (about 35 us an edge: 0.3 s for 8,000), so a
  // big recolour writes both where the pinned vis-network 9.1.2 reads them while drawing
  // (body.edges[id].options.color, .title) and into the DataSet's stored items, then redraws
  // once. Anything unexpected there: false, and the caller goes through the DataSet.
  var DIRECT_ABOVE = 200;
  function writeColours(items) {
    var body = network.body && network.body.edges, stored = edges._data;
    if (!body || !stored || typeof stored.get !== "function") return false;
    for (var i = 0; i < items.length; i++) {
      var e = body[items[i].id], d = stored.get(items[i].id);
      if (!e || !e.options || !e.options.color || !d) return false;
    }
    items.forEach(function (it) {
      var e = body[it.id], o = e.options.color, d = stored.get(it.id), c = it.color.color;
      o.color = c; o.highlight = c; o.hover = c;
      e.title = it.title;
      d.color = it.color; d.title = it.title;
    });
    network.redraw();
    return true;
  }

  // all: restyle every edge (new values); otherwise only the edges whose colour changes
  // with the threshold, and only their colour and title
  function recolourEdges(all) {
    var v = state.shown, items = [];
    state.run.edges.forEach(function (e, i) {
      var x = v.edges[i], colour = edgeColour(x), item;
      if (!all && state.edgeColour[i] === colour) return;
      state.edgeColour[i] = colour;
      if (all) {
        item = edgeStyle(x);
      } else {
        item = { color: colourObject(colour) };
      }
      item.id = "e" + i;
      item.title = edgeTitle(e, x);
      items.push(item);
    });
    if (!items.length) return;
    if (all || items.length <= DIRECT_ABOVE || !writeColours(items)) edges.update(items);
  }

  // the server drew the first frame already: remember its colours instead of redoing it
  function noteColours(threshold) {
    var v = state.shown, t = state.threshold;
    state.threshold = threshold;
    state.edgeColour = state.run.edges.map(function (e, i) { return edgeColour(v.edges[i]); });
    state.threshold = t;
  }

  function restyle() { restyleNodes(); recolourEdges(true); }

  // ---- data sources: the server's api/, or the history embedded by --export ------------

  function getJSON(url) {
    return fetch(url, { cache: "no-store" }).then(function (r) {
      return r.json().then(function (body) {
        if (!r.ok) throw new Error(body && body.error ? body.error : "HTTP " + r.status);
        return body;
      });
    });
  }

  function decodeStep(p) {
    return { step: p.step, gradient_norm: decList(p.gradient_norm),
             activation_grad_norm: decList(p.activation_grad_norm), edges: decList(p.edges),
             revision: p.revision };
  }

  function decodeLayer(p) {
    var params = Object.create(null), stats = Object.create(null);
    Object.keys(p.params).forEach(function (k) { params[k] = decList(p.params[k]); });
    Object.keys(p.stats || {}).forEach(function (k) { stats[k] = decList(p.stats[k]); });
    return { id: p.id, gradient_norm: decList(p.gradient_norm),
             activation_grad_norm: decList(p.activation_grad_norm), params: params,
             stats: stats };
  }

  // the roll-up the page shows, for every request: the server answers in its order
  function viewQuery(view) {
    var v = view || state.view, q = "depth=" + (v.depth === null ? "full" : v.depth);
    v.expanded.forEach(function (g) { q += "&expand=" + encodeURIComponent(g); });
    return q;
  }

  var serverSource = {
    step: function (i) {
      return getJSON("api/step?step=" + encodeURIComponent(state.run.steps[i]) + "&" +
                     viewQuery()).then(decodeStep);
    },
    layer: function (id) {
      return getJSON("api/layer?id=" + encodeURIComponent(id) + "&" + viewQuery())
        .then(decodeLayer);
    },
  };

  function floats(text) {
    var bin = atob(text), buf = new ArrayBuffer(bin.length), u8 = new Uint8Array(buf);
    for (var i = 0; i < bin.length; i++) u8[i] = bin.charCodeAt(i);
    return { f: new Float32Array(buf), u: new Uint32Array(buf) };
  }
  function at(a, k) { return a.u[k] === ABSENT_BITS ? null : a.f[k]; }

  function exportSource(h) {
    var grad = floats(h.grad), act = floats(h.act), edge = floats(h.edge);
    var nn = h.n_nodes, ne = h.n_edges;
    function column(a, n, j) {
      return state.run.steps.map(function (_, i) { return at(a, i * n + j); });
    }
    return {
      step: function (i) {
        var out = { step: state.run.steps[i], gradient_norm: [], activation_grad_norm: [],
                    edges: [] };
        for (var j = 0; j < nn; j++) {
          out.gradient_norm.push(at(grad, i * nn + j));
          out.activation_grad_norm.push(at(act, i * nn + j));
        }
        for (var k = 0; k < ne; k++) out.edges.push(at(edge, i * ne + k));
        return Promise.resolve(out);
      },
      layer: function (id) {
        var j = state.run.nodes.findIndex(function (n) { return n.id === id; });
        function series(src) {
          var out = Object.create(null);
          Object.keys(src || {}).forEach(function (k) {
            var a = floats(src[k]);
            out[k] = state.run.steps.map(function (_, i) { return at(a, i); });
          });
          return out;
        }
        return Promise.resolve({ id: id, gradient_norm: column(grad, nn, j),
                                 activation_grad_norm: column(act, nn, j),
                                 params: series(h.params[id]), stats: series(h.stats[id]) });
      },
    };
  }

  var source = state.mode === "export" ? exportSource(data.history) : serverSource;

  // ---- controls ------------------------------------------------------------------------

  function thresholdRange() {
    var s = state.payload.scales.edge, t = state.threshold;
    var lt = t > 0 ? Math.log10(t) : s.lo - 1;
    return [Math.floor(Math.min(s.lo, lt)) - 1, Math.ceil(Math.max(s.hi, lt)) + 1, lt];
  }

  function setupThreshold() {
    var input = $("gv-threshold"), r = thresholdRange();
    input.min = r[0]; input.max = r[1]; input.value = r[2];
    $("gv-threshold-value").textContent = fmt(state.threshold);
  }

  function setThreshold(t) {
    state.threshold = t;
    $("gv-threshold-value").textContent = fmt(t);
    recolourEdges(false);
  }

  $("gv-threshold").addEventListener("input", function (ev) {
    state.thresholdMoved = true;
    setThreshold(Math.pow(10, Number(ev.target.value)));
  });

  function setupStepSlider() {
    var steps = state.run.steps, input = $("gv-step");
    $("gv-step-control").hidden = steps.length < 2;
    input.max = Math.max(steps.length - 1, 0);
    input.value = Math.max(state.index, 0);
    showStepLabel();
  }

  function showStepLabel() {
    var steps = state.run.steps;
    $("gv-step-value").textContent = steps.length ?
      steps[state.index] + " (" + (state.index + 1) + "/" + steps.length + ")" : "";
  }

  function showStep(i) {
    var steps = state.run.steps;
    if (!steps.length) return Promise.resolve();
    i = Math.min(Math.max(i, 0), steps.length - 1);
    state.index = i;
    state.follow = i === steps.length - 1;
    $("gv-step").value = i;
    showStepLabel();
    var token = ++state.token;
    return source.step(i).then(function (v) {
      if (token !== state.token) return;  // a later move of the slider won
      if (v.revision !== undefined && v.revision !== state.revision) return reload();
      state.shown = v;
      state.shownStep = v.step;
      restyle();
      renderDetails();
      drawLoss();
    }).catch(report);
  }

  $("gv-step").addEventListener("input", function (ev) { showStep(Number(ev.target.value)); });

  function findLayer(q) {
    var ids = state.run.nodes.map(function (n) { return n.id; });
    if (ids.indexOf(q) >= 0) return q;
    var lq = q.toLowerCase();
    for (var i = 0; i < ids.length; i++) if (ids[i].toLowerCase().indexOf(lq) >= 0) return ids[i];
    return null;
  }

  // a layer rolled up into a group: [group, layer id], exact name first, or null
  function hiddenIn(q) {
    var lq = q.toLowerCase(), partial = null;
    for (var i = 0; i < state.run.nodes.length; i++) {
      var n = state.run.nodes[i];
      for (var j = 0; j < (n.members || []).length; j++) {
        var m = n.members[j];
        if (m === q) return [n.id, m];
        if (partial === null && m.toLowerCase().indexOf(lq) >= 0) partial = [n.id, m];
      }
    }
    return partial;
  }

  // expand the groups around a layer until it is drawn, then select it
  function reveal(id, tries) {
    if (nodeInfo(id)[0]) { select(id, true); return Promise.resolve(); }
    var hit = hiddenIn(id);
    if (!hit || hit[1] !== id || tries > 16) return Promise.resolve();
    return setExpanded(wantedView().expanded.concat([hit[0]])).then(function () {
      return reveal(id, tries + 1);
    });
  }

  function search() {
    var q = $("gv-search").value.trim(), status = $("gv-search-status");
    if (!q) { status.textContent = ""; return; }
    var id = findLayer(q), hit = id === null && canChangeView() ? hiddenIn(q) : null;
    if (id === null && hit === null) {
      status.textContent = "no layer matches “" + q + "”";
      return;
    }
    status.textContent = "";
    if (id !== null) select(id, true); else reveal(hit[1], 0);
  }
  $("gv-search-form").addEventListener("submit", function (ev) { ev.preventDefault(); search(); });
  $("gv-search").addEventListener("change", search);

  function fillLayerList() {
    var list = $("gv-layer-list");
    list.replaceChildren();
    state.run.nodes.forEach(function (n) {
      var o = document.createElement("option");
      o.value = n.id;
      list.appendChild(o);
    });
  }

  // ---- details of one layer ------------------------------------------------------------

  function nodeInfo(id) {
    for (var i = 0; i < state.run.nodes.length; i++) {
      if (state.run.nodes[i].id === id) return [state.run.nodes[i], i];
    }
    return [null, -1];
  }

  // vis ids are positions ("n3"): names from the file stay out of vis-network's objects
  function visId(id) { var i = nodeInfo(id)[1]; return i < 0 ? null : "n" + i; }
  function nameOf(vid) {
    var n = state.run.nodes[Number(String(vid).slice(1))];
    return n ? n.id : null;
  }

  function edgeInfo(id) {
    for (var i = 0; i < state.run.edges.length; i++) {
      if (state.run.edges[i].id === id) return [state.run.edges[i], i];
    }
    return [null, -1];
  }

  function selectEdge(id) {
    if (!edgeInfo(id)[0]) return;
    state.selected = null;
    state.selectedEdge = id;
    renderDetails();
  }

  function select(id, focus) {
    var found = nodeInfo(id);
    if (!found[0]) return;
    state.selected = id;
    state.selectedEdge = null;
    network.selectNodes(["n" + found[1]]);
    if (focus) {
      // no animation: vis-network 9 leaves an interrupted animation running, which later
      // drags the view back when a second focus starts before the first one ends
      network.focus("n" + found[1], { scale: Math.max(network.getScale(), 1.0), locked: false,
                          animation: false });
    }
    renderDetails();
    if (!state.run.steps.length || state.layers[id]) return;
    source.layer(id).then(function (h) {
      state.layers[id] = h;
      if (state.selected === id) renderDetails();
    }).catch(report);
  }

  network.on("click", function (p) {
    if (p.nodes.length) {
      select(nameOf(p.nodes[0]), false);
    } else if (p.edges.length) {
      var e = state.run.edges[Number(String(p.edges[0]).slice(1))];
      if (e) selectEdge(e.id);
    }
  });
  network.on("doubleClick", function (p) {
    if (p.nodes.length) expand(nameOf(p.nodes[0]));
  });

  // ---- roll-up: groups of layers, expanded and collapsed through the server ------------

  function canChangeView() { return state.mode !== "export"; }

  // The view asked for last, drawn or not yet: what the next change builds on. state.view
  // is the view drawn: it changes only when the server has answered with the new one
  // (until then, and for good if that fails, step requests are for the nodes drawn).
  function wantedView() { return state.asked || state.view; }

  function setView(depth, expanded) {
    if (!canChangeView()) return Promise.resolve();
    state.asked = { depth: depth, expanded: expanded, options: state.view.options,
                    auto: false };
    return reload();
  }

  // other groups expanded, at the depth asked for last
  function setExpanded(expanded) { return setView(wantedView().depth, expanded); }

  function expand(id) {
    var info = nodeInfo(id)[0];
    if (!info || info.kind !== "group" || !canChangeView()) return Promise.resolve();
    state.selected = null;
    return setExpanded(wantedView().expanded.concat([id]));
  }

  // the expanded group a node sits in (the innermost), or null
  function enclosing(id) {
    var best = null;
    state.view.expanded.forEach(function (g) {
      if (id.indexOf(g + ".") === 0 && (best === null || g.length > best.length)) best = g;
    });
    return best;
  }

  function collapse(group) {
    var keep = wantedView().expanded.filter(function (g) {
      return g !== group && g.indexOf(group + ".") !== 0;
    });
    state.selected = group;
    state.selectedEdge = null;
    return setExpanded(keep);
  }

  function setupDepth() {
    var select = $("gv-depth"), v = state.view;
    $("gv-depth-control").hidden = !canChangeView() || v.options.length < 2;
    select.replaceChildren();
    v.options.forEach(function (o) {
      var opt = document.createElement("option");
      opt.value = o[0] === null ? "full" : String(o[0]);
      opt.textContent = (o[0] === null ? "every layer" : "depth " + o[0]) +
        " (" + fmtCount(o[1]) + ")";
      select.appendChild(opt);
    });
    select.value = v.depth === null ? "full" : String(v.depth);
    select.title = "roll layers up by the first parts of their names (node counts in brackets)";
  }

  $("gv-depth").addEventListener("change", function (ev) {
    var d = ev.target.value;
    setView(d === "full" ? null : Number(d), []);
  });

  function renderActions(id, info) {
    var box = $("gv-details-actions"), group = enclosing(id);
    box.replaceChildren();
    if (canChangeView() && info.kind === "group") {
      var b = el("button", "expand");
      b.type = "button";
      b.addEventListener("click", function () { expand(id); });
      box.appendChild(b);
    }
    if (canChangeView() && group !== null) {
      var c = el("button", "collapse " + group);
      c.type = "button";
      c.addEventListener("click", function () { collapse(group); });
      box.appendChild(c);
    }
    box.hidden = !box.childNodes.length;
  }

  function row(tbody, name, value, numeric) {
    var tr = document.createElement("tr");
    tr.appendChild(el("th", name));
    tr.appendChild(el("td", value, numeric ? "gv-num" : ""));
    tbody.appendChild(tr);
  }

  // an edge: its gradient at the shown step, beside its ends' (no history chart)
  function renderEdgeDetails() {
    var panel = $("gv-details-panel"), found = edgeInfo(state.selectedEdge);
    var e = found[0], x = e ? state.shown.edges[found[1]] : null;
    if (!e) { panel.hidden = true; state.selectedEdge = null; return; }
    panel.hidden = false;
    $("gv-details-actions").hidden = true;
    $("gv-details-title").textContent = e.source + " → " + e.target;
    $("gv-details-sub").textContent = "edge" + (e.via.length ? " · via " + e.via.join(", ") : "");
    var tbody = $("gv-details-table").tBodies[0], v = state.shown;
    tbody.replaceChildren();
    if (v.step !== null && v.step !== undefined) row(tbody, "step", v.step, true);
    row(tbody, "gradient norm", edgeNorm(x), true);
    row(tbody, "threshold", fmt(state.threshold), true);
    [[e.source, "output gradient of "], [e.target, "output gradient of "]].forEach(function (end) {
      var k = nodeInfo(end[0])[1];
      if (k >= 0) row(tbody, end[1] + end[0], fmt(v.activation_grad_norm[k]), true);
    });
    var chart = $("gv-layer-chart");
    chart.hidden = true;
    chart.nextElementSibling.hidden = true;
  }

  function renderDetails() {
    if (state.selectedEdge !== null) { renderEdgeDetails(); return; }
    var id = state.selected;
    var panel = $("gv-details-panel");
    if (id === null) { panel.hidden = true; return; }
    var found = nodeInfo(id), info = found[0], i = found[1];
    if (!info) { panel.hidden = true; state.selected = null; return; }
    panel.hidden = false;
    renderActions(id, info);
    $("gv-details-title").textContent = id;
    $("gv-details-sub").textContent = info.type + " · " + info.kind +
      (info.param_count !== null ? " · " + fmtCount(info.param_count) + " parameters" : "");
    var tbody = $("gv-details-table").tBodies[0];
    tbody.replaceChildren();
    var v = state.shown, h = state.layers[id], k = state.index;
    if (v.step !== null && v.step !== undefined) row(tbody, "step", v.step, true);
    if (info.has_params) row(tbody, "gradient norm", fmt(v.gradient_norm[i]), true);
    row(tbody, "activation gradient norm", fmt(v.activation_grad_norm[i]), true);
    info.params.forEach(function (p) {
      var x = h ? (h.params[p.name] || [])[k] : (state.run.steps.length ? undefined : dec(p.gradient_norm));
      var label = p.name + (p.shape ? " [" + p.shape.join("×") + "]" : "") +
        (p.trainable === false ? " (frozen)" : "");
      row(tbody, label, x === undefined ? "…" : fmt(x), true);
    });
    // forward statistics, when the run recorded them (activation_stats=True)
    var stats = h ? h.stats : (state.run.steps.length ? {} : info.stats || {});
    Object.keys(STATS).forEach(function (key) {
      if (!(key in stats)) return;
      var x = h ? stats[key][k] : dec(stats[key]);
      var pct = key.slice(-5) === "_frac";
      row(tbody, STATS[key], x === null || x === undefined ? "absent" :
          pct && Number.isFinite(x) ? (100 * x).toFixed(1) + " %" : fmt(x), true);
    });
    var chart = $("gv-layer-chart");
    chart.hidden = !state.run.steps.length;
    chart.nextElementSibling.hidden = chart.hidden;
    if (!chart.hidden) {
      var series = h ? (info.has_params ? h.gradient_norm : h.activation_grad_norm) : [];
      drawChart(chart, state.run.steps, series,
                { log: true, colour: state.payload.palette.layer, height: 140 });
    }
  }

  // ---- charts (canvas, drawn by hand) --------------------------------------------------

  function drawChart(canvas, xs, ys, opt) {
    var dpr = window.devicePixelRatio || 1, W = 320, H = opt.height;
    canvas.width = W * dpr; canvas.height = H * dpr;
    var c = canvas.getContext("2d");
    c.setTransform(dpr, 0, 0, dpr, 0, 0);
    c.clearRect(0, 0, W, H);
    c.font = "11px system-ui, sans-serif";
    c.fillStyle = "#777";
    var L = 52, R = 8, T = 8, B = 20;
    var t = function (y) { return opt.log ? Math.log10(y) : y; };
    var ok = ys.filter(function (y) { return y !== null && Number.isFinite(y) && (!opt.log || y > 0); });
    if (!xs.length || !ok.length) {
      c.fillText(ys.length || !xs.length ? "no values to draw" : "loading…", L, H / 2);
      return;
    }
    var lo = Math.min.apply(null, ok.map(t)), hi = Math.max.apply(null, ok.map(t));
    if (hi - lo < 1e-12) { lo -= opt.log ? 0.5 : Math.abs(lo) * 0.1 + 1e-9; hi += opt.log ? 0.5 : Math.abs(hi) * 0.1 + 1e-9; }
    var x0 = xs[0], x1 = xs[xs.length - 1] === x0 ? x0 + 1 : xs[xs.length - 1];
    var px = function (x) { return L + (x - x0) / (x1 - x0) * (W - L - R); };
    var py = function (y) { return T + (1 - (t(y) - lo) / (hi - lo)) * (H - T - B); };
    c.strokeStyle = "#ccc"; c.lineWidth = 1;
    c.beginPath(); c.moveTo(L, T); c.lineTo(L, H - B); c.lineTo(W - R, H - B); c.stroke();
    var top = opt.log ? Math.pow(10, hi) : hi, bottom = opt.log ? Math.pow(10, lo) : lo;
    c.textAlign = "right";
    c.fillText(fmt(top), L - 4, T + 8);
    c.fillText(fmt(bottom), L - 4, H - B);
    c.textAlign = "left"; c.fillText(String(xs[0]), L, H - 6);
    c.textAlign = "right"; c.fillText(String(xs[xs.length - 1]), W - R, H - 6);
    if (state.index >= 0 && state.index < xs.length) {  // where the step slider is
      c.strokeStyle = "#999"; c.setLineDash([3, 3]);
      c.beginPath(); c.moveTo(px(xs[state.index]), T); c.lineTo(px(xs[state.index]), H - B);
      c.stroke(); c.setLineDash([]);
    }
    c.strokeStyle = opt.colour; c.lineWidth = 1.6;
    c.beginPath();
    var pen = false;
    ys.forEach(function (y, i) {
      if (y === null || !Number.isFinite(y) || (opt.log && y <= 0)) { pen = false; return; }
      if (pen) c.lineTo(px(xs[i]), py(y)); else c.moveTo(px(xs[i]), py(y));
      pen = true;
    });
    c.stroke();
    if (ok.length === 1) {
      var j = ys.indexOf(ok[0]);
      c.fillStyle = opt.colour; c.fillRect(px(xs[j]) - 2, py(ok[0]) - 2, 4, 4);
    }
    c.fillStyle = state.payload.palette.nonfinite;  // NaN/Inf: marks along the top edge
    ys.forEach(function (y, i) {
      if (y !== null && !Number.isFinite(y)) c.fillRect(px(xs[i]) - 2, T - 2, 4, 6);
    });
  }

  function drawLoss() {
    var loss = decList(state.run.loss);
    $("gv-loss-panel").hidden = !state.run.steps.length;
    if (state.run.steps.length) {
      drawChart($("gv-loss-chart"), state.run.steps, loss,
                { log: false, colour: "#444444", height: 120 });
    }
  }

  // ---- side panels ---------------------------------------------------------------------

  function renderNotices() {
    var box = $("gv-notices"), msgs = [];
    if (!state.run.edges.length) {
      msgs.push("This file has no edges: the layers are drawn without connections, " +
                "in forward order.");
    }
    if (!state.run.steps.length) {
      msgs.push(state.run.version === 0 ?
        "This file is in the original minimal format: one snapshot, no history, " +
        "so there is no step slider and no charts." :
        "This file has no recorded steps yet: norms appear once training records one.");
    }
    if (!state.run.nodes.length) msgs.push("This file has no layers.");
    var groups = state.run.nodes.filter(function (n) { return n.kind === "group"; }).length;
    if (groups) {
      var full = state.view.options.length ? state.view.options[state.view.options.length - 1][1] : 0;
      msgs.push("Rolled up by module name" +
        (state.view.depth !== null ? " to depth " + state.view.depth : "") + ": " +
        fmtCount(state.run.nodes.length) + " of " + fmtCount(full) + " nodes shown, " +
        fmtCount(groups) + " of them groups of layers (squares). " +
        (canChangeView() ? "Double-click a group to expand it, or pick a depth above." :
         "Run visualize.py on the file to expand groups."));
    }
    box.replaceChildren();
    msgs.forEach(function (m) { box.appendChild(el("p", m)); });
    box.hidden = !msgs.length;
  }

  // how a group opens: by double-click where a server rolls up, not in an exported page
  function expandHint() {
    return canChangeView() ? "double-click to expand" :
      "to expand it, serve the run with visualize.py (this page has one roll-up)";
  }

  function renderLegend() {
    var s = state.payload.scales;
    $("gv-legend-expand").textContent = expandHint();
    $("gv-legend-expand").closest("li").hidden = !state.run.nodes.some(function (n) {
      return n.kind === "group";
    });
    $("gv-legend-size").textContent = "layer: size grows with log10 of its gradient norm, " +
      fmt(Math.pow(10, s.node.lo)) + " (small) to " + fmt(Math.pow(10, s.node.hi)) +
      " (large), clamped";
    $("gv-legend-width").textContent = "edge width: log10 of its norm, " +
      fmt(Math.pow(10, s.edge.lo)) + " to " + fmt(Math.pow(10, s.edge.hi));
  }

  function renderFindings() {
    var list = $("gv-findings"), fs = state.run.findings;
    list.replaceChildren();
    $("gv-findings-panel").hidden = !fs.length;
    fs.forEach(function (f) {
      var li = el("li", null, "gv-" + f.severity);
      li.appendChild(el("span", f.severity, "gv-sev"));
      li.appendChild(el("strong", f.kind, "gv-kind"));  // (as the report: "critical vanishing")
      li.appendChild(el("span", f.message || ""));
      var extra = [], named = f.layers.length > 8 ?  // (88 names pushed the charts away)
        f.layers.slice(0, 6).join(", ") + " and " + (f.layers.length - 6) + " more" :
        f.layers.join(", ");
      if (f.steps.length) extra.push("steps " + f.steps.join("–"));
      if (f.layers.length) extra.push("layers: " + named);
      if (extra.length) li.appendChild(el("div", extra.join(" · "), "gv-muted gv-small"));
      if (f.suggestions.length) {
        var ul = el("ul", null, "gv-sugg");
        f.suggestions.forEach(function (s) { ul.appendChild(el("li", s)); });
        li.appendChild(ul);
      }
      li.title = f.layers.length ? "show " + f.layers[0] : "";
      li.addEventListener("click", function () { if (f.layers.length) select(f.layers[0], true); });
      list.appendChild(li);
    });
  }

  function renderMeta() {
    var tbody = $("gv-meta").tBodies[0], run = state.run;
    tbody.replaceChildren();
    $("gv-source").textContent = run.source;
    row(tbody, "file", run.source || "(embedded)");
    row(tbody, "layers", fmtCount(run.nodes.length) + " nodes, " + fmtCount(run.edges.length) +
        " edges");
    run.meta.forEach(function (kv) {
      if (kv[0] === "steps" || kv[0] === "last_step") return;
      row(tbody, kv[0], kv[1] === null ? "—" : String(kv[1]));
    });
    row(tbody, "recorded steps", run.steps.length ?
        fmtCount(run.steps.length) + " (" + run.steps[0] + "–" + run.steps[run.steps.length - 1] + ")" :
        "none");
  }

  function report(err) {
    state.errors.push(String(err && err.message ? err.message : err));
    var live = $("gv-live");
    live.textContent = "error: " + state.errors[state.errors.length - 1];
    live.classList.add("gv-error");
  }

  // ---- live updates --------------------------------------------------------------------

  function sameStructure(a, b) {
    if (a.nodes.length !== b.nodes.length || a.edges.length !== b.edges.length) return false;
    for (var i = 0; i < a.nodes.length; i++) if (a.nodes[i].id !== b.nodes[i].id) return false;
    for (var j = 0; j < a.edges.length; j++) if (a.edges[j].id !== b.edges[j].id) return false;
    return true;
  }

  function applyPayload(p) {
    state.token++;  // a step answer still on its way was asked for the old view or file
    var same = sameStructure(state.run, p.run);
    var follow = state.follow, index = state.index;
    state.payload = p;
    state.run = p.run;
    state.view = p.run.view;
    // (the file replaced by a run with its own vanishing threshold: take it, unless the
    // slider was moved; the colours below follow state.threshold)
    if (!state.thresholdMoved) state.threshold = p.threshold;
    state.revision = p.run.revision;
    state.layers = Object.create(null);
    if (!same) {
      state.edgeColour = [];
      nodes.clear(); edges.clear();
      nodes.add(p.nodes); edges.add(p.edges);
      network.setOptions(p.options);
      network.fit();
      fillLayerList();
    }
    renderAll();
    setupThreshold();
    setupDepth();
    var n = state.run.steps.length;
    if (follow || index >= n) {
      state.index = n - 1;
      state.follow = true;
      state.shown = latestValues(state.run);
      state.shownStep = state.shown.step;
      setupStepSlider();
      if (same) {
        restyle();
      } else {  // drawn by the server for the latest step, at its threshold: fix the colours
        noteColours(p.threshold);
        recolourEdges(false);
      }
      renderDetails(); drawLoss();
    } else {
      setupStepSlider();
      showStep(index);
    }
    if (state.selected !== null) select(state.selected, false);
    else if (state.selectedEdge !== null) renderDetails();
  }

  function reload() {
    var done = getJSON("api/graph?" + viewQuery(wantedView())).then(function (p) {
      if (done !== state.graphPending) return state.graphPending;  // a later one: wait for it
      state.asked = null;
      applyPayload(p);
    }).catch(function (err) {
      if (done !== state.graphPending) return;  // (a later request decides what is drawn)
      state.asked = null;  // back on the view drawn, the menu too
      setupDepth();
      report(err);
    });
    state.graphPending = done;
    return done;
  }

  function poll() {
    if (state.polling) return;
    state.polling = true;
    getJSON("api/poll").then(function (p) {
      var live = $("gv-live");
      if (p.error) {
        live.textContent = "cannot re-read the file (" + p.error + "); showing the last good version";
        live.classList.add("gv-error");
      } else {
        live.textContent = "live · " + fmtCount(p.steps) + (p.steps === 1 ? " step" : " steps");
        live.classList.remove("gv-error");
      }
      if (p.revision !== state.revision) return reload();
    }).catch(function () {
      $("gv-live").textContent = "server not reachable";
      $("gv-live").classList.add("gv-error");
    }).then(function () { state.polling = false; });
  }

  // ---- start ---------------------------------------------------------------------------

  function renderAll() {
    renderNotices(); renderLegend(); renderFindings(); renderMeta();
  }

  state.shown = latestValues(state.run);
  state.shownStep = state.shown.step;
  fillLayerList();
  renderAll();
  setupThreshold();
  setupDepth();
  setupStepSlider();
  noteColours(data.threshold);  // nodes and edges arrive styled (render.py, same encoding)
  if (!canChangeView() && state.run.nodes.some(function (n) { return n.kind === "group"; })) {
    restyleNodes();  // (their titles said "double-click to expand", which only a server does)
  }
  drawLoss();
  if (state.live) {
    $("gv-live").textContent = "live";
    window.setInterval(poll, 2000);
  }
  state.ready = true;
  window.gradviz = { nodes: nodes, edges: edges, network: network, state: state,
                     showStep: showStep, setThreshold: setThreshold, select: select,
                     reload: reload, visId: visId, nameOf: nameOf, restyle: restyle,
                     expand: expand, collapse: collapse, setView: setView };
})();
