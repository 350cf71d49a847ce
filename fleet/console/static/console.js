/* edgefleet console: live refresh, API actions with the CSRF token, charts.
 *
 * No inline scripts anywhere (the Content-Security-Policy forbids them): pages declare
 * what they want with data- attributes and this file wires it up.
 *   - Live: one EventSource on /ui/events; each notice {"topics": [...]} fires
 *     "ef:<topic>" on <body>; htmx parts refresh with hx-trigger="ef:devices from:body".
 *   - Actions: <button data-action="/v1/rollouts/r1/pause" data-method="POST"
 *     [data-body='{"k": 1}'] [data-confirm="..."]> calls the JSON API.
 *   - Forms: <form data-api="/v1/assignments" data-method="POST"> posts its fields as
 *     JSON (type=number → number, checkbox → boolean, data-list="," → list, empty → left
 *     out, dotted names nest: fallback.mode; target_kind + target_value → "target");
 *     data-redirect="/ui/rollouts/{id}" follows with fields of the answer.
 *   - Uploads: <form data-upload="/v1/models"> sends its file input's file as the raw
 *     body with a <progress> inside the form showing the bytes sent.
 *   - Shared with the pages' own scripts (devices.js, models.js, rollouts.js, which
 *     draw their charts with uPlot): EF.api, EF.getJson, EF.toast, EF.fire, EF.PALETTE.
 */
(function () {
  "use strict";
  var csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  var EF = (window.EF = window.EF || {});
  EF.charts = [];

  function toast(text, bad) {
    var el = document.getElementById("toast");
    if (!el) return;
    el.textContent = text;
    el.className = bad ? "bad" : "";
    el.hidden = false;
    clearTimeout(el._t);
    el._t = setTimeout(function () { el.hidden = true; }, bad ? 8000 : 4000);
  }
  EF.toast = toast;

  function fire(topic) {
    document.body.dispatchEvent(new CustomEvent("ef:" + topic, { bubbles: true }));
  }
  EF.fire = fire;

  /* ---------------------------------------------------------------- API calls */
  EF.api = function (method, url, body) {
    var opts = { method: method, credentials: "same-origin",
      headers: { "X-CSRF-Token": csrf, "Accept": "application/json" } };
    if (body !== undefined && body !== null) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    return fetch(url, opts).then(function (r) {
      return r.text().then(function (text) {
        var doc = null;
        try { doc = text ? JSON.parse(text) : null; } catch (e) { doc = { error: text }; }
        if (!r.ok) {
          var err = new Error((doc && doc.error) || (r.status + " " + r.statusText));
          err.status = r.status; err.doc = doc;
          throw err;
        }
        return doc;
      });
    });
  };

  function formJson(form) {
    var out = {};
    Array.prototype.forEach.call(form.elements, function (el) {
      if (!el.name || el.disabled || el.type === "submit" || el.type === "file") return;
      if (el.name === "csrf_token") return;
      var v;
      if (el.type === "checkbox") v = el.checked;
      else if (el.type === "radio") { if (!el.checked) return; v = el.value; }
      else {
        v = el.value.trim();
        if (v === "") return;
        if (el.type === "number") v = Number(v);
        else if (el.dataset.list !== undefined) v = v.split(el.dataset.list || ",").map(function (s) { return s.trim(); }).filter(Boolean);
        else if (el.dataset.json !== undefined) { try { v = JSON.parse(v); } catch (e) { throw new Error(el.name + ": not valid JSON"); } }
      }
      if (el.name === "target_kind" || el.name === "target_value") return;  // see below
      var path = el.name.split(".");
      var at = out;
      for (var i = 0; i < path.length - 1; i++) at = at[path[i]] = at[path[i]] || {};
      at[path[path.length - 1]] = v;
    });
    // A target picked as kind + value becomes the API's {"device": id} | {"group": g} | {"all": true}.
    var kind = form.elements.namedItem("target_kind");
    if (kind && kind.value) {
      var value = form.elements.namedItem("target_value");
      var v = value ? value.value.trim() : "";
      if (kind.value === "all") out.target = { all: true };
      else if (!v) throw new Error("name the " + kind.value + " (or pick all devices)");
      else { out.target = {}; out.target[kind.value] = v; }
    }
    return out;
  }
  EF.formJson = formJson;

  function fill(template, doc) {
    return template.replace(/\{(\w+)\}/g, function (_, k) { return encodeURIComponent(doc && doc[k] != null ? doc[k] : ""); });
  }

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest("[data-action]");
    if (!btn) return;
    ev.preventDefault();
    if (btn.dataset.confirm && !window.confirm(btn.dataset.confirm)) return;
    btn.disabled = true;
    EF.api(btn.dataset.method || "POST", btn.dataset.action, btn.dataset.body || null)
      .then(function (doc) {
        toast(btn.dataset.done || "Done.");
        if (btn.dataset.redirect) window.location = fill(btn.dataset.redirect, doc);
        (btn.dataset.refresh || "").split(",").filter(Boolean).forEach(fire);
      })
      .catch(function (err) { toast(err.message, true); })
      .finally(function () { btn.disabled = false; });
  });

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    if (form.dataset.api) {
      ev.preventDefault();
      var body;
      try { body = formJson(form); } catch (e) { toast(e.message, true); return; }
      var submit = form.querySelector('[type="submit"]');
      if (submit) submit.disabled = true;
      EF.api(form.dataset.method || "POST", fill(form.dataset.api, body), body)
        .then(function (doc) {
          toast(form.dataset.done || "Done.");
          if (form.dataset.redirect) window.location = fill(form.dataset.redirect, doc);
          (form.dataset.refresh || "").split(",").filter(Boolean).forEach(fire);
          if (form.dataset.reset !== undefined) form.reset();
        })
        .catch(function (err) { toast(err.message, true); })
        .finally(function () { if (submit) submit.disabled = false; });
    } else if (form.dataset.upload) {
      ev.preventDefault();
      upload(form);
    }
  });

  function upload(form) {
    var input = form.querySelector('input[type="file"]');
    var bar = form.querySelector("progress");
    var status = form.querySelector(".upload-status");
    if (!input || !input.files.length) { toast("Choose a bundle file first.", true); return; }
    var file = input.files[0];
    var xhr = new XMLHttpRequest();
    xhr.open("POST", form.dataset.upload);
    xhr.setRequestHeader("X-CSRF-Token", csrf);
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.setRequestHeader("Accept", "application/json");
    xhr.upload.onprogress = function (e) {
      if (!e.lengthComputable) return;
      if (bar) { bar.max = e.total; bar.value = e.loaded; }
      if (status) status.textContent = Math.round(100 * e.loaded / e.total) + " % sent";
    };
    xhr.onload = function () {
      var doc = null;
      try { doc = JSON.parse(xhr.responseText); } catch (e) { doc = { error: xhr.responseText }; }
      if (xhr.status >= 200 && xhr.status < 300) {
        if (status) status.textContent = "Uploaded " + (doc.name || "") + " " + (doc.version || "");
        toast("Uploaded " + (doc.name || "") + " " + (doc.version || "") + ".");
        fire("models");
        if (form.dataset.redirect) window.location = fill(form.dataset.redirect, doc);
      } else {
        if (status) status.textContent = "Refused: " + (doc && doc.error);
        toast("Upload refused: " + (doc && doc.error), true);
      }
    };
    xhr.onerror = function () { toast("Upload failed: the connection dropped.", true); };
    xhr.send(file);
  }

  /* ------------------------------------------------ shared by the pages' charts */
  // Series colours (devices.js, models.js, rollouts.js draw their charts with uPlot).
  EF.PALETTE = ["#2b6cb0", "#38a169", "#d69e2e", "#805ad5", "#dd6b20", "#319795", "#c53030"];

  // GET a JSON document with the session; rejects with the API's {"error"} message.
  EF.getJson = function (url) {
    return fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) {
        return r.json().then(function (d) { if (!r.ok) throw new Error(d.error || r.status); return d; });
      });
  };

  /* ---------------------------------------------------------------------- live */
  function connect() {
    if (!window.EventSource || !document.body.dataset.role) return;
    var dot = document.getElementById("live");
    var es = new EventSource("/ui/events");
    es.onopen = function () { if (dot) { dot.classList.add("on"); dot.title = "live"; } };
    es.onerror = function () { if (dot) { dot.classList.remove("on"); dot.title = "reconnecting"; } };
    es.addEventListener("change", function (ev) {
      var doc;
      try { doc = JSON.parse(ev.data); } catch (e) { return; }
      (doc.topics || []).forEach(fire);
    });
    EF.events = es;
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.body.addEventListener("htmx:configRequest", function (ev) {
      ev.detail.headers["X-CSRF-Token"] = csrf;
    });
    connect();
  });
})();
