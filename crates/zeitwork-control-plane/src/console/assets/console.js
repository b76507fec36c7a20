// Zeitwork console: API calls from forms, live status from the event stream,
// following logs, a memory sparkline. Strings from the server only ever go
// into textContent, never into HTML.
"use strict";
(function () {
  const csrf = () => (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));

  async function call(method, path, body, file) {
    const opts = { method, credentials: "same-origin", headers: { "X-CSRF-Token": csrf() } };
    if (file) {
      opts.headers["Content-Type"] = "application/x-tar";
      opts.body = file;
    } else if (body !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(body);
    }
    const res = await fetch(path, opts);
    const text = await res.text();
    let data = null;
    try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
    if (res.status === 401) { location.href = "/sign-in?ended=1"; throw new Error("signed out"); }
    if (!res.ok) throw new Error((data && data.error && data.error.message) || ("the operator answered " + res.status));
    return data;
  }

  // Form fields → JSON body: `a.b` nests, checkboxes are booleans, data-number is a number,
  // empty fields are left out (but for PUT), data-in="path" fields fill {name} in the path instead.
  async function formCall(form) {
    // An image archive is uploaded first; the deployment then names what it became.
    const file = $("input[type=file][data-upload]", form);
    if (file && file.files.length) {
      const up = await call("POST", file.dataset.upload, undefined, file.files[0]);
      form.elements.image.value = up.image;
    }
    if (form.elements.image && !form.elements.image.value) throw new Error("Give an image or choose an archive.");
    let path = form.dataset.path;
    const method = form.dataset.method;
    const body = {};
    let any = false;
    for (const el of form.elements) {
      if (!el.name) continue;
      let v = el.type === "checkbox" ? el.checked : el.value;
      if (el.dataset.in === "path") { path = path.replace("{" + el.name + "}", encodeURIComponent(v)); continue; }
      if (v === "" && method !== "PUT") continue; // PUT sets a value, and an empty one is a value

      if (el.hasAttribute("data-number")) v = Number(v);
      if (el.hasAttribute("data-list")) v = v.split(",").map((x) => x.trim()).filter((x) => x);
      const keys = el.name.split(".");
      let o = body;
      while (keys.length > 1) { const k = keys.shift(); o = o[k] = o[k] || {}; }
      o[keys[0]] = v;
      any = true;
    }
    return call(method, path, any || method === "PUT" ? body : undefined);
  }

  function parseDotenv(text) {
    const out = [];
    for (let line of text.split(/\r?\n/)) {
      line = line.trim();
      if (!line || line.startsWith("#")) continue;
      if (line.startsWith("export ")) line = line.slice(7).trim();
      const i = line.indexOf("=");
      if (i < 1) throw new Error("not KEY=VALUE: " + line);
      let v = line.slice(i + 1).trim();
      if (v.length >= 2 && (v[0] === '"' || v[0] === "'") && v[v.length - 1] === v[0]) v = v.slice(1, -1);
      out.push([line.slice(0, i).trim(), v]);
    }
    return out;
  }

  function then(form, result) {
    const t = form.dataset.then || "reload";
    if (t === "reload") { location.reload(); return; }
    if (t === "secret") {
      const out = $("#secret");
      out.textContent = "Token created. Copy it now, it is not shown again: " + result.secret;
      out.hidden = false;
      return;
    }
    if (t.startsWith("go:")) {
      const values = Object.assign({}, result || {});
      for (const el of form.elements) if (el.name && !(el.name in values)) values[el.name] = el.value;
      location.href = t.slice(3).replace(/\{(\w+)\}/g, (_, k) => encodeURIComponent(values[k] || ""));
    }
  }

  document.addEventListener("submit", async (ev) => {
    const form = ev.target;
    if (!form.matches("form.action")) return;
    ev.preventDefault();
    if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) return;
    const err = $(".error", form);
    const button = $("button[type=submit]", form);
    err.hidden = true;
    button.disabled = true;
    try {
      let result;
      if (form.dataset.kind === "dotenv") {
        for (const [k, v] of parseDotenv(form.elements.dotenv.value)) {
          result = await call("PUT", form.dataset.path + "/" + encodeURIComponent(k), { value: v });
        }
      } else {
        result = await formCall(form);
      }
      then(form, result);
    } catch (e) {
      err.textContent = e.message;
      err.hidden = false;
    } finally {
      button.disabled = document.body.classList.contains("offline");
    }
  });

  // ---------------------------------------------------------------- live status

  function setStatus(id, status) {
    for (const el of $$("[data-status-of]")) {
      if (el.dataset.statusOf !== id) continue;
      el.textContent = status;
      el.className = "status s-" + status;
    }
  }

  function timelineEntry(change) {
    const list = $("#timeline");
    if (!list || change.kind !== "deployment" || list.dataset.deployment !== change.id) return;
    if (list.dataset.last === change.status) return;
    list.dataset.last = change.status;
    const li = document.createElement("li");
    const t = document.createElement("time");
    t.dateTime = change.at;
    t.textContent = change.at.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC");
    li.append(t, " " + (change.previous ? change.previous + " → " : "") + change.status + (change.reason ? " — " + change.reason : ""));
    list.append(li);
  }

  function historyRow(change) {
    const table = $("#history tbody");
    if (!table || change.kind !== "deployment" || $$("[data-deployment]", table).some((r) => r.dataset.deployment === change.id)) return;
    if (change.previous) return; // only new deployments get a row; others are on the page already
    const tr = document.createElement("tr");
    tr.dataset.deployment = change.id;
    const cell = (node) => { const td = document.createElement("td"); if (node) td.append(node); tr.append(td); };
    const a = document.createElement("a");
    a.href = "/deployments/" + encodeURIComponent(change.id);
    a.textContent = change.id;
    cell(a);
    cell(null);
    const s = document.createElement("span");
    s.dataset.statusOf = change.id;
    s.className = "status s-" + change.status;
    s.textContent = change.status;
    cell(s);
    for (let i = tr.children.length; i < table.closest("table").tHead.rows[0].cells.length; i++) cell(null);
    table.prepend(tr);
  }

  // Sections marked data-refresh (current deployments, URLs, instances, nodes) are
  // re-rendered by the server after changes: fetched as a page, parsed, swapped in.
  let refreshTimer;
  function refreshSections() {
    const sections = $$("[data-refresh][id]");
    if (!sections.length) return;
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(async () => {
      try {
        const res = await fetch(location.href, { credentials: "same-origin" });
        if (!res.ok) return;
        const doc = new DOMParser().parseFromString(await res.text(), "text/html");
        for (const s of sections) {
          const fresh = doc.getElementById(s.id);
          if (fresh && s.isConnected) s.replaceWith(document.importNode(fresh, true));
        }
      } catch (_) { /* the next change tries again */ }
    }, 500);
  }

  let dropped = false;
  function offline(on) {
    $("#banner").hidden = !on;
    document.body.classList.toggle("offline", on);
    for (const b of $$("form.action button[type=submit]")) b.disabled = on;
  }

  // After a drop, re-read what may have changed meanwhile.
  async function resync() {
    const ids = new Set($$("[data-status-of]").map((e) => e.dataset.statusOf).filter((id) => /-[a-z0-9]{7}-/.test(id)));
    for (const id of Array.from(ids).slice(0, 50)) {
      try { const d = await call("GET", "/api/v1/deployments/" + encodeURIComponent(id)); setStatus(id, d.status); } catch (_) { /* shown as it was */ }
    }
  }

  function stream() {
    const url = document.body.dataset.stream;
    if (!url || !window.EventSource) return;
    let es;
    const open = () => {
      es = new EventSource(url);
      window.zwStream = es;
      // Changes between the page's rendering and the stream's opening are read once it is open.
      es.onopen = () => { resync(); if (dropped) { dropped = false; refreshSections(); } offline(false); };
      es.onerror = () => {
        if (leaving.signal.aborted) return;
        dropped = true;
        offline(true);
        if (es.readyState === EventSource.CLOSED) setTimeout(open, 3000);
      };
      const on = (ev) => {
        let change;
        try { change = JSON.parse(ev.data); } catch (_) { return; }
        setStatus(change.id, change.status);
        timelineEntry(change);
        historyRow(change);
        refreshSections();
      };
      for (const kind of ["deployment", "instance", "node"]) es.addEventListener(kind, on);
      es.addEventListener("lagged", resync);
    };
    open();
  }

  // ---------------------------------------------------------------- logs

  // Long-lived requests end with the page: a browser holds only six connections to a host over HTTP/1.1.
  const leaving = new AbortController();
  window.addEventListener("pagehide", () => {
    leaving.abort();
    if (window.zwStream) window.zwStream.close();
  });

  async function follow(pre) {
    const max = 2000;
    while (!leaving.signal.aborted) {
      try {
        const res = await fetch(pre.dataset.follow, { credentials: "same-origin", signal: leaving.signal });
        if (!res.ok) throw new Error("logs: " + res.status);
        const reader = res.body.getReader();
        const dec = new TextDecoder();
        let buf = "";
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += dec.decode(value, { stream: true });
          let i;
          while ((i = buf.indexOf("\n")) >= 0) {
            const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
            pre.append(document.createTextNode(buf.slice(0, i + 1)));
            buf = buf.slice(i + 1);
            while (pre.childNodes.length > max) pre.firstChild.remove();
            if (atEnd) pre.scrollTop = pre.scrollHeight;
          }
        }
      } catch (_) { /* retried below */ }
      await new Promise((r) => setTimeout(r, 3000));
      pre.dataset.follow = pre.dataset.follow.replace(/since=[^&]*/, "since=5s");
    }
  }

  // A build's output: followed while it runs, picked up where it broke off.
  async function followBuild(pre) {
    let received = 0;
    while (!leaving.signal.aborted) {
      try {
        const res = await fetch(pre.dataset.build + "/log?follow=true&offset=" + received, { credentials: "same-origin", signal: leaving.signal });
        if (!res.ok) throw new Error("build log: " + res.status);
        const reader = res.body.getReader();
        const dec = new TextDecoder();
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          const text = dec.decode(value, { stream: true });
          received += Array.from(text).length;
          const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
          pre.append(document.createTextNode(text));
          if (atEnd) pre.scrollTop = pre.scrollHeight;
        }
        const b = await call("GET", pre.dataset.build);
        const badge = $("#build-status");
        if (badge) { badge.textContent = b.status; badge.className = "status s-" + b.status; }
        if (b.status === "succeeded" || b.status === "failed") {
          // The build decided the deployment's next status: show it without waiting for the stream.
          try { const d = await call("GET", "/api/v1/deployments/" + encodeURIComponent(b.deployment)); setStatus(d.id, d.status); } catch (_) { /* the stream brings it */ }
          return;
        }
      } catch (_) { /* retried below */ }
      await new Promise((r) => setTimeout(r, 3000));
    }
  }

  // ---------------------------------------------------------------- metrics

  function sparkline(svg) {
    const points = [];
    const caption = $("#spark-now");
    const tick = async () => {
      if (document.hidden) return;
      try {
        const m = await call("GET", svg.dataset.metrics);
        points.push(m.memory_bytes);
        if (points.length > 60) points.shift();
        const max = Math.max(1, ...points);
        const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
        line.setAttribute("points", points.map((v, i) => (i * 300 / 59).toFixed(1) + "," + (38 - (v / max) * 36).toFixed(1)).join(" "));
        svg.replaceChildren(line);
        caption.textContent = (m.memory_bytes / 1048576).toFixed(1) + " MiB now across " + m.ready + " ready instance(s)";
      } catch (e) { caption.textContent = e.message; }
    };
    tick();
    setInterval(tick, 5000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    stream();
    const pre = $("#logs[data-follow]");
    if (pre) follow(pre);
    const build = $("#build-log[data-build]");
    if (build) followBuild(build);
    const svg = $("#spark[data-metrics]");
    if (svg) sparkline(svg);
  });
})();
