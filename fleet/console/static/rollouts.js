/* Rollout page (fleet/console/templates/rollout.html): one chart per gate, the canary
 * against the baseline over time with the threshold drawn in.
 *
 * #gate-charts[data-series] names the JSON route (GET /v1/rollouts/{id}/gates/series);
 * each .gate-chart[data-stage][data-gate] inside gets its gate's columns drawn with
 * uPlot: canary (with its 95 % interval as a band), baseline, threshold (red, dashed,
 * stepped: a relative gate's threshold moves with the baseline). The charts are
 * redrawn when the fleet stores a change (ef:rollouts, ef:telemetry from console.js's
 * live stream), at most once a second. No inline script: the CSP forbids it.
 */
(function () {
  "use strict";
  var box, url, busy = false, again = false, last = 0, timer = null;

  function pctAxis(signal) {
    return signal === "p95_ms" ? function (u, vals) { return vals.map(function (v) { return v + " ms"; }); }
      : signal === "drift_psi" ? null
      : function (u, vals) { return vals.map(function (v) { return (100 * v).toFixed(1) + " %"; }); };
  }

  function draw(el, g) {
    if (el._plot) { el._plot.destroy(); el._plot = null; }
    el.innerHTML = "";
    el.dataset.points = String(g.t.length);
    if (!g.t.length) {
      var p = document.createElement("div");
      p.className = "empty";
      p.textContent = "Not evaluated yet: the gate waits for its first figures.";
      el.appendChild(p);
      return;
    }
    var fmt = pctAxis(g.signal);
    var value = function (u, v) {
      if (v == null) return "—";
      if (g.signal === "p95_ms") return v + " ms";
      if (g.signal === "drift_psi") return v.toFixed(3);
      return (100 * v).toFixed(2) + " %";
    };
    var opts = {
      width: Math.max(320, el.clientWidth || 640),
      height: 240,
      scales: { x: { time: true } },
      series: [
        {},
        { label: "canary 95 % low", stroke: "rgba(43,108,176,0.35)", width: 1, dash: [2, 3], value: value },
        { label: "canary 95 % high", stroke: "rgba(43,108,176,0.35)", width: 1, dash: [2, 3], value: value },
        { label: "canary", stroke: "#2b6cb0", width: 2, points: { show: true, size: 5 }, value: value },
        { label: "baseline", stroke: "#38a169", width: 2, value: value },
        { label: "threshold", stroke: "#c53030", width: 1.5, dash: [6, 4], value: value,
          paths: window.uPlot.paths && window.uPlot.paths.stepped ? window.uPlot.paths.stepped({ align: 1 }) : undefined }
      ],
      bands: [{ series: [2, 1], fill: "rgba(43,108,176,0.12)" }],
      axes: [{}, { values: fmt || undefined, size: 64 }]
    };
    var data = [g.t, g.canary_low, g.canary_high, g.canary, g.baseline, g.threshold];
    el._plot = new window.uPlot(opts, data, el);
  }

  function refresh() {
    if (!box) return;
    if (busy) { again = true; return; }
    busy = true;
    last = Date.now();
    EF.getJson(url)
      .then(function (doc) {
        var byKey = {};
        doc.gates.forEach(function (g) { byKey[g.stage + "\u0000" + g.gate] = g; });
        box.querySelectorAll(".gate-chart").forEach(function (el) {
          var g = byKey[el.dataset.stage + "\u0000" + el.dataset.gate];
          if (g) draw(el, g);
        });
        box.dataset.loadedAt = String(Date.now());
      })
      .catch(function (err) {
        box.querySelectorAll(".gate-chart").forEach(function (el) { el.textContent = "Chart unavailable: " + err.message; });
      })
      .finally(function () {
        busy = false;
        if (again) { again = false; soon(); }
      });
  }

  function soon() {
    // At most one fetch a second however often the fleet stores telemetry.
    if (timer) return;
    var wait = Math.max(0, 1000 - (Date.now() - last));
    timer = setTimeout(function () { timer = null; refresh(); }, wait);
  }

  document.addEventListener("DOMContentLoaded", function () {
    box = document.getElementById("gate-charts");
    if (!box || !box.querySelector(".gate-chart")) return;
    url = box.dataset.series;
    refresh();
    document.body.addEventListener("ef:rollouts", soon);
    document.body.addEventListener("ef:telemetry", soon);
    window.addEventListener("resize", function () {
      box.querySelectorAll(".gate-chart").forEach(function (el) {
        if (el._plot) el._plot.setSize({ width: Math.max(320, el.clientWidth || 640), height: 240 });
      });
    });
  });
})();
