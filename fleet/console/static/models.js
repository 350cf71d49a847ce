/* Model page (fleet/console/templates/model.html): fleet-wide charts per version, and
 * the assign form with its rollout plan.
 *
 * Charts: #model-charts[data-series] is a time-series URL (GET /v1/series/models/{m},
 * fleet/timeseries.py: {"t": [...], "lines": [{"version"}...], "<field>": [[...] per
 * line]}); each .series-chart[data-field] inside draws that field, one line per
 * version, with uPlot. One fetch for all of them, again on ef:telemetry (at most
 * every 5 s).
 *
 * Assign: form#assign-form[data-assign] is turned into the body of POST /v1/assignments:
 * target {group|device|all}, version (or label), then either nothing more (a plain
 * assignment), top-level waves (a plain staged rollout), or a plan (gates or a shadow
 * stage given). A rollout opens its page; errors (the API's 400/404/409) are toasted.
 */
(function () {
  "use strict";
  var PALETTE = EF.PALETTE;
  var box, timer = null, last = 0;

  function fmt(unit) {
    if (unit === "pct") return function (u, v) { return v == null ? "—" : (100 * v).toFixed(1) + " %"; };
    if (unit === "ms") return function (u, v) { return v == null ? "—" : v + " ms"; };
    if (unit === "psi") return function (u, v) { return v == null ? "—" : v.toFixed(3); };
    return function (u, v) { return v == null ? "—" : String(v); };
  }

  function draw(el, doc) {
    var field = el.dataset.field, unit = el.dataset.unit;
    var lines = doc.lines || [], cols = doc[field] || [];
    var any = cols.some(function (c) { return c && c.some(function (x) { return x != null; }); });
    el.dataset.points = any ? String(doc.t.length) : "0";
    if (!doc.t || !doc.t.length || !any) {
      if (el._plot) { el._plot.destroy(); el._plot = null; }
      el.innerHTML = "";
      var p = document.createElement("div");
      p.className = "empty";
      p.textContent = "No telemetry in this range.";
      el.appendChild(p);
      return;
    }
    var value = fmt(unit);
    var series = [{}], data = [doc.t];
    lines.forEach(function (line, i) {
      series.push({ label: "v" + line.version, stroke: PALETTE[i % PALETTE.length], width: 2, value: value });
      data.push(cols[i]);
    });
    if (el.dataset.threshold) {
      var th = Number(el.dataset.threshold);
      series.push({ label: "threshold", stroke: "#c53030", dash: [6, 4], width: 1.5 });
      data.push(doc.t.map(function () { return th; }));
    }
    var axis = unit === "pct" ? function (u, vals) { return vals.map(function (v) { return (100 * v).toFixed(0) + " %"; }); } : undefined;
    var scales = { x: { time: true } };
    // Rates: 0 % at the bottom, and a flat line of zeros is not drawn as "0 to 10,000 %".
    if (unit === "pct") scales.y = { range: function (u, lo, hi) { return [0, hi > 0 ? Math.min(1, hi * 1.2) : 0.1]; } };
    series.slice(1).forEach(function (s) { s.points = { show: true, size: 4 }; });
    var old = el._plot;
    el.innerHTML = "";
    if (old) old.destroy();
    el._plot = new window.uPlot({ width: Math.max(320, el.clientWidth || 520), height: 200,
      scales: scales, series: series, axes: [{}, { values: axis, size: 56 }] }, data, el);
  }

  function load() {
    last = Date.now();
    return EF.getJson(box.dataset.series)
      .then(function (doc) {
        box.querySelectorAll(".series-chart").forEach(function (el) { draw(el, doc); });
        box.dataset.loadedAt = String(Date.now());
      })
      .catch(function (err) {
        box.querySelectorAll(".series-chart").forEach(function (el) { el.textContent = "Chart unavailable: " + err.message; });
      });
  }

  function soon() {
    if (timer) return;
    timer = setTimeout(function () { timer = null; load(); }, Math.max(0, 5000 - (Date.now() - last)));
  }

  /* ------------------------------------------------------------------ assign */
  function lines(text) {
    return (text || "").split("\n").map(function (s) { return s.trim(); }).filter(Boolean);
  }

  function waves(text) {
    return (text || "").split(",").map(function (s) { return s.trim(); }).filter(Boolean)
      .map(function (w) { return /^\d+$/.test(w) ? Number(w) : w; });
  }

  function num(form, name) {
    var el = form.elements[name];
    if (!el || el.value.trim() === "") return undefined;
    return Number(el.value);
  }

  function assignBody(form) {
    var f = form.elements;
    var kind = f.target_kind.value, target = {};
    if (kind === "all") target.all = true;
    else {
      var value = f.target.value.trim();
      if (!value) throw new Error("Name the " + kind + " to assign to.");
      target[kind] = value;
    }
    var body = { model: form.dataset.model, version: f.version.value, target: target };
    var w = waves(f.waves.value), gates = lines(f.gates.value), shadow = f.shadow.checked;
    var share = num(form, "max_failure_share"), timeout = num(form, "wave_timeout_s");
    if (!w.length) {
      if (gates.length || shadow) throw new Error("Gates and a shadow stage need waves, e.g. 1, 10%, 100%.");
      if (timeout !== undefined) throw new Error("A wave timeout needs waves.");
      return body;
    }
    if (!gates.length && !shadow) {
      body.waves = w;
      if (share !== undefined) body.max_failure_share = share;
      if (timeout !== undefined) body.wave_timeout_s = timeout;
      return body;
    }
    var plan = { waves: w, gates: gates, on_fail: f.on_fail.value };
    var promote = f.promote.value.trim();
    plan.promote = promote || null;
    ["min_requests", "min_baseline_requests", "min_audited"].forEach(function (k) {
      var v = num(form, k);
      if (v !== undefined) plan[k] = v;
    });
    if (share !== undefined) plan.max_failure_share = share;
    if (timeout !== undefined) plan.wave_timeout_s = timeout;
    if (shadow) {
      var devices = f.shadow_devices.value.trim() || "1";
      var s = { devices: /^\d+$/.test(devices) ? Number(devices) : devices, gates: lines(f.shadow_gates.value) };
      var rate = num(form, "shadow_sample_rate"), bake = num(form, "shadow_min_duration_s"), items = num(form, "shadow_min_items");
      if (rate !== undefined) s.sample_rate = rate;
      if (bake !== undefined) s.min_duration_s = bake;
      if (items !== undefined) s.min_items = items;
      if (!s.gates.length) delete s.gates;
      plan.shadow = s;
    }
    body.plan = plan;
    return body;
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (!form.dataset || !form.dataset.assign) return;
    ev.preventDefault();
    var body;
    try { body = assignBody(form); } catch (e) { window.EF.toast(e.message, true); return; }
    var submit = form.querySelector('[type="submit"]');
    if (submit) submit.disabled = true;
    window.EF.api("POST", form.dataset.assign, body)
      .then(function (doc) {
        if (doc && doc.id) { window.location = "/ui/rollouts/" + encodeURIComponent(doc.id); return; }
        window.EF.toast("Assigned " + body.model + " " + (doc && doc.version) + ".");
        window.EF.fire("models");
      })
      .catch(function (err) { window.EF.toast(err.message, true); })
      .finally(function () { if (submit) submit.disabled = false; });
  });

  document.addEventListener("DOMContentLoaded", function () {
    box = document.getElementById("model-charts");
    if (!box) return;
    load();
    document.body.addEventListener("ef:telemetry", soon);
    // The range buttons: the same charts over another window (step "auto" keeps them cheap).
    document.querySelectorAll("#model-range [data-range]").forEach(function (btn) {
      btn.addEventListener("click", function () {
        box.dataset.series = box.dataset.base + "?from=" + encodeURIComponent(btn.dataset.range);
        document.querySelectorAll("#model-range [data-range]").forEach(function (b) { b.classList.toggle("primary", b === btn); });
        load();
      });
    });
  });
})();
