/* edgefleet console, device pages: the filter form, the device's charts, the groups and
 * enrolment-token forms. Loaded after console.js (both deferred, in document order) and
 * built on its EF helpers (EF.api with the CSRF token, EF.toast, EF.fire) and uPlot.
 *
 *   - form[data-autosubmit]: a changed <select> submits the (GET) filter form, so the
 *     URL always says what is shown.
 *   - #device-charts[data-series]: one GET of the device's time series (columnar JSON,
 *     one line per model version: fleet/timeseries.py), drawn into each
 *     [data-metric="f1,f2"] chart as one uPlot line per version and field, and the
 *     confidence histogram as bars (console.js's EF.draw takes one column per field;
 *     this answer has one per version, and a lone point must show as a dot); redrawn
 *     on "ef:telemetry" (at most once a second) and when a [data-range] button picks
 *     another range. Each chart gets data-points (the
 *     non-empty points drawn) for tests and people alike.
 *   - form[data-groups]: PUT {"groups": [...]} (an empty field clears the groups).
 *   - form[data-enrol]: POST an enrolment token and show it once.
 * Text from the server (model names, versions) only ever goes in as textContent.
 */
(function () {
  "use strict";
  var EF = window.EF || {};

  function lineLabel(line) { return line.model + " " + line.version; }

  function countPoints(cols) {
    var n = 0;
    cols.forEach(function (col) { col.forEach(function (v) { if (v !== null && v !== undefined) n++; }); });
    return n;
  }

  function drawHistogram(el, hist, lines) {
    el.textContent = "";
    var total = 0;
    (hist.counts || []).forEach(function (row) { row.forEach(function (c) { total += c; }); });
    el.dataset.points = String(total);
    if (!total) {
      var p = document.createElement("div");
      p.className = "empty";
      p.textContent = "No answers in this range yet.";
      el.appendChild(p);
      return;
    }
    hist.counts.forEach(function (row, j) {
      var sum = row.reduce(function (a, b) { return a + b; }, 0);
      if (!sum) return;
      var max = Math.max.apply(null, row);
      var wrap = document.createElement("div");
      wrap.className = "hist-row";
      var label = document.createElement("div");
      label.className = "hist-label";
      label.textContent = lineLabel(lines[j]) + " · " + sum + " answers";
      wrap.appendChild(label);
      var bars = document.createElement("div");
      bars.className = "hist-bars";
      row.forEach(function (c, i) {
        var lo = i === 0 ? 0 : hist.le[i - 1];
        var hi = i < hist.le.length ? hist.le[i] : null;
        var bar = document.createElement("div");
        bar.className = "hist-bar";
        bar.title = (hi === null ? "> " + lo : lo + "–" + hi) + ": " + c;
        var fill = document.createElement("span");
        fill.style.height = (max ? Math.round(100 * c / max) : 0) + "%";
        bar.appendChild(fill);
        var tick = document.createElement("small");
        tick.textContent = hi === null ? ">" + lo : String(hi);
        bar.appendChild(tick);
        bars.appendChild(bar);
      });
      wrap.appendChild(bars);
      el.appendChild(wrap);
    });
  }

  var REDRAW_MS = 1000;
  var PALETTE = EF.PALETTE;

  /* One uPlot chart: a line per column, with its points drawn (a step with data
   * between two empty ones is a dot, not nothing), and the threshold dashed. */
  function plot(el, t, cols, labels, threshold) {
    if (el._plot) { el._plot.destroy(); el._plot = null; }
    el.textContent = "";
    if (!t.length) {
      var p = document.createElement("div");
      p.className = "empty";
      p.textContent = "No data in this range yet.";
      el.appendChild(p);
      return;
    }
    var series = [{}], data = [t];
    cols.forEach(function (col, i) {
      var color = PALETTE[i % PALETTE.length];
      series.push({ label: labels[i], stroke: color, width: 2, spanGaps: false,
        points: { show: true, size: 5, fill: color, stroke: color } });
      data.push(col);
    });
    if (threshold !== undefined && threshold !== "") {
      var th = Number(threshold);
      series.push({ label: "threshold", stroke: "#c53030", dash: [6, 4], width: 1.5, points: { show: false } });
      data.push(t.map(function () { return th; }));
    }
    var width = Math.max(260, el.clientWidth - 4);
    el._plot = new window.uPlot({ width: width, height: 200, series: series, scales: { x: { time: true } } }, data, el);
  }

  function drawCharts(root) {
    var url = root.dataset.series + "?from=" + encodeURIComponent(root.dataset.from || "-1h");
    var errorEl = root.querySelector(".chart-error");
    return EF.getJson(url)
      .then(function (doc) {
        if (errorEl) errorEl.hidden = true;
        var lines = doc.lines || [];
        root.querySelectorAll("[data-metric]").forEach(function (el) {
          var metrics = el.dataset.metric.split(",");
          var data = { t: doc.t || [] };
          var fields = [], labels = [], cols = [];
          metrics.forEach(function (m) {
            (doc[m] || []).forEach(function (col, j) {
              var key = m + "#" + j;
              data[key] = col;
              fields.push(key);
              cols.push(col);
              labels.push(lineLabel(lines[j]) + (metrics.length > 1 ? " " + m.replace("_ms", "") : ""));
            });
          });
          var points = countPoints(cols);
          plot(el, points ? data.t : [], cols, labels, el.dataset.threshold);
          el.dataset.points = String(points);
        });
        root.querySelectorAll("[data-hist]").forEach(function (el) {
          drawHistogram(el, doc[el.dataset.hist] || { counts: [] }, lines);
        });
        root.dataset.loadedAt = String(Date.now());
      })
      .catch(function (err) {
        if (errorEl) { errorEl.textContent = "Charts unavailable: " + err.message; errorEl.hidden = false; }
      });
  }

  function wireCharts(root) {
    var busy = false, again = false, last = 0, pending = null;
    function redraw() {
      if (busy) { again = true; return; }
      busy = true;
      last = Date.now();
      drawCharts(root).finally(function () {
        busy = false;
        if (again) { again = false; redraw(); }
      });
    }
    redraw();
    // Telemetry arrives all the time on a big fleet (a notice every 0.5 s): redraw at
    // most once a second, at once when the last redraw is older (the live goal is 2 s
    // from a record's arrival to the chart; one device's series is a few ms to fetch).
    document.body.addEventListener("ef:telemetry", function () {
      if (pending) return;
      pending = setTimeout(function () { pending = null; redraw(); },
        Math.max(0, REDRAW_MS - (Date.now() - last)));
    });
    document.querySelectorAll("[data-range]").forEach(function (btn) {
      btn.addEventListener("click", function () {
        root.dataset.from = btn.dataset.range;
        document.querySelectorAll("[data-range]").forEach(function (b) { b.classList.toggle("active", b === btn); });
        redraw();
      });
    });
  }

  function listOf(text) {
    return text.split(",").map(function (s) { return s.trim(); }).filter(Boolean);
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.dataset.groups) {
      ev.preventDefault();
      var groups = listOf(form.elements.groups.value);
      EF.api("PUT", form.dataset.groups, { groups: groups })
        .then(function (doc) {
          EF.toast("Groups saved: " + (doc.groups.join(", ") || "none") + ".");
          EF.fire("devices");
        })
        .catch(function (err) { EF.toast(err.message, true); });
    } else if (form.dataset.enrol) {
      ev.preventDefault();
      var body = { groups: listOf(form.elements.groups.value), ttl_s: Number(form.elements.ttl_s.value) };
      var id = form.elements.device_id.value.trim();
      if (id) body.device_id = id;
      var submit = form.querySelector('[type="submit"]');
      if (submit) submit.disabled = true;
      EF.api("POST", form.dataset.enrol, body)
        .then(function (doc) {
          var box = document.getElementById("enrol-result");
          document.getElementById("enrol-token").textContent = doc.token;
          document.getElementById("enrol-meta").textContent =
            "For " + (doc.device_id || "a new device id") +
            (doc.groups.length ? " in " + doc.groups.join(", ") : "") +
            "; expires " + new Date(doc.expires_at * 1000).toLocaleString() + ".";
          box.hidden = false;
          form.reset();
        })
        .catch(function (err) { EF.toast(err.message, true); })
        .finally(function () { if (submit) submit.disabled = false; });
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("form[data-autosubmit] select").forEach(function (sel) {
      sel.addEventListener("change", function () { sel.form.requestSubmit(); });
    });
    var charts = document.getElementById("device-charts");
    if (charts && charts.dataset.series) wireCharts(charts);
  });
})();
