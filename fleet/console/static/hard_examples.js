/* edgefleet console: the hard-example labelling queue (/ui/hard-examples).
 *
 * Keyboard (shown on the page):
 *   - a class's key (<kbd> on its button: its own one-character name, else 1-9, 0, a-z
 *     without "s") picks that class; the cloud's answer is picked when an example opens;
 *   - Enter confirms: PUT /v1/hard-examples/{id}/label {"label": ...} through EF.api
 *     (the session's CSRF token; the API checks the role and the label, and audits it),
 *     then the next unlabelled example opens;
 *   - ArrowDown/ArrowRight and ArrowUp/ArrowLeft move through the queue; "s" skips to
 *     the next example without labelling.
 * Keys typed into a form field, or with Ctrl/Alt/Meta, are left alone.
 * The queue (#he-queue) is refreshed by htmx on "ef:hard_examples"; the open example's
 * panel (#he-detail) is fetched as a fragment (HX-Request) and is not replaced by live
 * updates, so a refresh never takes the labeller's place away.
 * Tensor heat-maps: <canvas data-grid="[[0..1, ...], ...]"> drawn here.
 */
(function () {
  "use strict";
  var current = null; // id of the open example
  var picked = null; // the class picked for it
  var busy = false;

  function $(sel, root) { return (root || document).querySelector(sel); }
  function rows() { return Array.prototype.slice.call(document.querySelectorAll("#he-table tr.he-row")); }
  function rowOf(id) {
    return rows().filter(function (r) { return r.dataset.id === id; })[0] || null;
  }
  function toast(text, bad) { if (window.EF && EF.toast) EF.toast(text, bad); }

  function markRow(id) {
    rows().forEach(function (r) {
      var on = r.dataset.id === id;
      r.classList.toggle("current", on);
      if (on) r.scrollIntoView({ block: "nearest" });
    });
  }

  function filtersQuery() {
    var params = new URLSearchParams(window.location.search);
    params.delete("id");
    var s = params.toString();
    return s ? "?" + s : "";
  }

  /* ------------------------------------------------------------ the open example */
  function wire() {
    var item = $("#he-item");
    current = item ? item.dataset.id : null;
    picked = item ? (item.dataset.suggested || null) : null;
    showPicked();
    document.querySelectorAll("canvas.he-heatmap").forEach(drawHeatmap);
    markRow(current);
  }

  function open(id) {
    if (!id) return;
    current = id;
    markRow(id);
    fetch("/ui/hard-examples/" + encodeURIComponent(id), {
      credentials: "same-origin", headers: { "HX-Request": "true", "Accept": "text/html" }
    }).then(function (r) {
      if (!r.ok) throw new Error("example " + id.slice(0, 10) + ": " + r.status);
      return r.text();
    }).then(function (html) {
      if (current !== id) return; // another was opened meanwhile
      $("#he-detail").innerHTML = html; // the server's escaped template
      wire();
      if (window.history && history.replaceState) {
        history.replaceState(null, "", "/ui/hard-examples/" + id + filtersQuery());
      }
    }).catch(function (err) { toast(err.message, true); });
  }

  function showPicked() {
    document.querySelectorAll("#he-classes .he-class").forEach(function (b) {
      b.classList.toggle("picked", b.dataset.label === picked);
      b.setAttribute("aria-pressed", b.dataset.label === picked ? "true" : "false");
    });
  }

  function pick(label) { picked = label; showPicked(); }

  /* ------------------------------------------------------------------ the queue */
  function neighbour(step, unlabelledOnly) {
    var all = rows();
    var at = -1;
    for (var i = 0; i < all.length; i++) if (all[i].dataset.id === current) at = i;
    for (var j = at + step; j >= 0 && j < all.length; j += step) {
      if (!unlabelledOnly || !all[j].dataset.label) return all[j].dataset.id;
    }
    if (unlabelledOnly) { // wrap round once: skipped ones come back
      for (var k = 0; k < all.length; k++) {
        if (all[k].dataset.id !== current && !all[k].dataset.label) return all[k].dataset.id;
      }
    }
    return null;
  }

  function move(step) {
    var id = neighbour(step, false);
    if (id) open(id);
  }

  function skip() {
    var id = neighbour(1, true) || neighbour(1, false);
    if (id) open(id); else toast("Nothing after this one.");
  }

  function confirm() {
    var id = current;
    if (!id || busy || !$("#he-confirm")) return;
    if (!picked) { toast("Pick a class first (press its key).", true); return; }
    var label = picked;
    // The candidates for "next" in the queue's order as it is now: a live refresh may
    // replace the rows (without this one) before the answer comes back.
    var after = [];
    var all = rows();
    var at = all.indexOf(rowOf(id));
    all.slice(at + 1).concat(all.slice(0, Math.max(at, 0))).forEach(function (r) {
      if (r.dataset.id !== id && !r.dataset.label) after.push(r.dataset.id);
    });
    busy = true;
    EF.api("PUT", "/v1/hard-examples/" + encodeURIComponent(id) + "/label", { label: label })
      .then(function () {
        toast("Labelled " + id.slice(0, 10) + " as " + label + ".");
        var row = rowOf(id);
        var next = after.filter(function (c) {
          var r = rowOf(c);
          return r && !r.dataset.label;
        })[0] || null;
        if (row) {
          var queue = $("#he-queue");
          var count = $("#he-unlabelled");
          if (!row.dataset.label && count) count.textContent = String(Math.max(0, Number(count.textContent) - 1));
          row.dataset.label = label;
          row.classList.add("labelled");
          var cell = $(".he-label", row);
          if (cell) cell.textContent = label;
          // In the "unlabelled" view a labelled example leaves the queue at once.
          if (queue && queue.dataset.state === "unlabelled") row.remove();
        }
        if (next) open(next);
        else {
          $("#he-detail").innerHTML = "";
          var p = document.createElement("p");
          p.className = "muted";
          p.id = "he-empty";
          p.textContent = "All done: nothing left to label here.";
          $("#he-detail").appendChild(p);
          current = null;
        }
      })
      .catch(function (err) { toast(err.message, true); })
      .finally(function () { busy = false; });
  }

  /* ------------------------------------------------------------------ heat-maps */
  var RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function colour(v) {
    v = Math.max(0, Math.min(1, Number(v) || 0)) * (RAMP.length - 1);
    var i = Math.min(RAMP.length - 2, Math.floor(v));
    var f = v - i;
    var a = RAMP[i], b = RAMP[i + 1];
    return [0, 1, 2].map(function (c) { return Math.round(a[c] + (b[c] - a[c]) * f); });
  }
  function drawHeatmap(canvas) {
    var grid;
    try { grid = JSON.parse(canvas.dataset.grid || "[]"); } catch (e) { return; }
    var h = grid.length, w = h ? grid[0].length : 0;
    if (!w) return;
    var ctx = canvas.getContext("2d");
    var img = ctx.createImageData(w, h);
    for (var y = 0; y < h; y++) for (var x = 0; x < w; x++) {
      var rgb = colour(grid[y][x]);
      var o = 4 * (y * w + x);
      img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    canvas.dataset.drawn = "1";
  }

  /* ------------------------------------------------------------------- wiring */
  document.addEventListener("keydown", function (ev) {
    if (!$("#he-detail")) return;
    if (ev.ctrlKey || ev.altKey || ev.metaKey) return;
    var t = ev.target;
    if (t && (t.isContentEditable || /^(INPUT|SELECT|TEXTAREA)$/.test(t.tagName))) return;
    var key = ev.key;
    var handled = true;
    if (key === "ArrowDown" || key === "ArrowRight") move(1);
    else if (key === "ArrowUp" || key === "ArrowLeft") move(-1);
    else if (key === "Enter") confirm();
    else if (key === "s" || key === "S") skip();
    else if (key.length === 1) {
      var btn = null;
      document.querySelectorAll("#he-classes .he-class").forEach(function (b) {
        if (b.dataset.key && b.dataset.key === key.toLowerCase()) btn = b;
      });
      if (btn) pick(btn.dataset.label); else handled = false;
    } else handled = false;
    if (handled) ev.preventDefault();
  });

  document.addEventListener("click", function (ev) {
    var cls = ev.target.closest("#he-classes .he-class");
    if (cls) { pick(cls.dataset.label); return; }
    if (ev.target.closest("#he-confirm")) { confirm(); return; }
    if (ev.target.closest("#he-skip")) { skip(); return; }
    var row = ev.target.closest("#he-table tr.he-row");
    if (row && !(ev.ctrlKey || ev.metaKey || ev.shiftKey || ev.button)) {
      ev.preventDefault();
      open(row.dataset.id);
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    wire();
    document.body.addEventListener("htmx:afterSwap", function (ev) {
      if (ev.target && ev.target.id === "he-queue") markRow(current);
    });
  });
})();
