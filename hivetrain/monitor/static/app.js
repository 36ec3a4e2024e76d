// hivetrain monitor page: polls /api/state and draws it.
// Everything a peer wrote (names, ids, addresses, devices) reaches the page through textContent,
// title or SVG text nodes only, never as markup; the server's Content-Security-Policy forbids inline code.
"use strict";

(() => {
  const SVG = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  // ---- formatting (the tests read these numbers back) ------------------------------------------
  const none = "–";
  const fixed = (digits) => (v) => (v == null ? none : v.toFixed(digits));
  const fmt = {
    int: (v) => (v == null ? none : String(v)),
    rate: fixed(1),
    loss: fixed(3),
    lr: (v) => (v == null ? none : v.toPrecision(3)),
    pct: (v) => (v == null ? none : (100 * v).toFixed(1) + "%"),
    pct0: (v) => (v == null ? none : (100 * v).toFixed(0) + "%"),
    kilo: (v) => (v == null ? none : (v / 1000).toFixed(1)),
    duration: (s) => {
      if (s == null) return none;
      s = Math.round(s);
      if (s < 60) return s + " s";
      if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
      return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
    },
    clock: (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false }),
  };

  const el = (tag, props = {}, text) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props)) {
      if (key === "data") Object.assign(node.dataset, value);
      else node[key] = value; // properties such as className and title: never HTML
    }
    if (text != null) node.textContent = text;
    return node;
  };
  const svg = (tag, attrs = {}, text) => {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
    if (text != null) node.textContent = text;
    return node;
  };

  // ---- tiles -------------------------------------------------------------------------------------
  function renderTotals(state) {
    const t = state.totals;
    $("run-id").textContent = state.run_id;
    $("total-peers").textContent = fmt.int(t.peers);
    $("total-peers-sub").textContent = `${t.stale} stale · ${t.left} left`;
    $("total-samples_per_s").textContent = fmt.rate(t.samples_per_s);
    $("total-global_step").textContent = fmt.int(t.global_step);
    $("total-lr").textContent = t.lr == null ? "" : "lr " + fmt.lr(t.lr);
    $("total-data_epoch").textContent = fmt.int(t.data_epoch);
    $("total-loss").textContent = fmt.loss(t.loss);
    $("total-val_top1").textContent = fmt.pct(t.val_top1);
    $("total-val_top5").textContent = fmt.pct(t.val_top5);
    const refused = state.refused;
    $("total-refused").textContent = fmt.int(refused.forged + refused.malformed + refused.oversized);
    $("total-refused-sub").textContent =
      `${refused.forged} forged · ${refused.malformed} malformed · ${refused.oversized} oversized`;
    $("total-refused").parentElement.classList.toggle("alert", refused.forged + refused.malformed + refused.oversized > 0);
  }

  // ---- peers table -------------------------------------------------------------------------------
  const COLUMNS = [
    ["name", (p) => p.name],
    ["peer", (p) => p.peer.slice(0, 12) + (p.peer.length > 12 ? "…" : "")],
    ["state", (p) => p.state],
    ["device", (p) => p.device],
    ["samples_per_s", (p) => fmt.rate(p.samples_per_s), "num"],
    ["loss", (p) => fmt.loss(p.loss), "num"],
    ["lr", (p) => fmt.lr(p.lr), "num"],
    ["global_step", (p) => fmt.int(p.global_step), "num"],
    ["data_epoch", (p) => fmt.int(p.data_epoch), "num"],
    ["shards_read", (p) => fmt.int(p.shards_read), "num"],
    ["shards_claimed", (p) => fmt.int(p.shards_claimed), "num"],
    ["sync", (p) => p.sync || none],
    ["compute_frac", (p) => fmt.pct0(p.compute_frac), "num"],
    ["sync_wait_frac", (p) => fmt.pct0(p.sync_wait_frac), "num"],
    ["data_wait_frac", (p) => fmt.pct0(p.data_wait_frac), "num"],
    ["sent_per_s", (p) => fmt.kilo(p.sent_per_s), "num"],
    ["received_per_s", (p) => fmt.kilo(p.received_per_s), "num"],
    ["sent_per_sample", (p) => fmt.kilo(p.sent_per_sample), "num"],
    ["fetch_mb_s", (p) => fmt.rate(p.fetch_mb_s), "num"],
    ["val_top1", (p) => fmt.pct(p.val_top1), "num"],
    ["val_top5", (p) => fmt.pct(p.val_top5), "num"],
    ["uptime", (p) => fmt.duration(p.uptime), "num"],
    ["address", (p) => p.address || "client mode"],
  ];

  function renderPeers(peers) {
    const rows = peers.map((p) => {
      const row = el("tr", { className: "peer " + p.state, data: { id: p.id } });
      for (const [field, show, cls] of COLUMNS) {
        const cell = el("td", { className: cls || "", data: { field } }, show(p));
        if (field === "peer") cell.title = p.peer;
        if (field === "state") cell.title = `last record ${fmt.duration(p.age_s)} ago`;
        if (field === "address") cell.title = p.address;
        row.append(cell);
      }
      return row;
    });
    document.querySelector("#peers tbody").replaceChildren(...rows);
    $("no-peers").hidden = peers.length > 0;
  }

  // ---- shard grid --------------------------------------------------------------------------------
  let grid = null; // {count, names, cells, epoch}

  function shardTitle(epoch, i) {
    const name = epoch.names ? epoch.names[i] : `shard ${i}`;
    const holder = epoch.holders[i];
    const who = holder == null ? "" : ` · ${epoch.holder_names[holder] || "?"} (${holder})`;
    const state = { done: "done", claimed: "in progress", backup: "in progress, and a backup reader on it", free: "free" }[epoch.states[i]];
    return `${name}: ${state}${who}`;
  }

  function renderShards(epoch) {
    const box = $("shards");
    if (epoch == null) {
      box.replaceChildren(el("p", { className: "hint" }, "No shard list known yet (no peer has announced one)."));
      grid = null;
      for (const id of ["epoch-number", "epoch-done", "epoch-claimed", "epoch-backup", "epoch-free"]) $(id).textContent = none;
      return;
    }
    if (grid == null || grid.count !== epoch.count) {
      const cells = [];
      for (let i = 0; i < epoch.count; i++) cells.push(el("div", { className: "cell", data: { index: String(i) } }));
      box.replaceChildren(...cells);
      grid = { count: epoch.count, cells };
    }
    grid.epoch = epoch;
    epoch.states.forEach((state, i) => {
      const cell = grid.cells[i];
      cell.className = "cell " + state;
      cell.dataset.state = state;
      cell.dataset.holder = epoch.holders[i] || "";
      cell.title = shardTitle(epoch, i);
    });
    $("epoch-number").textContent = fmt.int(epoch.epoch);
    $("epoch-done").textContent = fmt.int(epoch.done);
    $("epoch-claimed").textContent = fmt.int(epoch.claimed);
    $("epoch-backup").textContent = fmt.int(epoch.backup);
    $("epoch-free").textContent = fmt.int(epoch.free);
    $("total-epoch-sub").textContent = `${epoch.done} of ${epoch.count} shards done`;
  }

  $("shards").addEventListener("mouseover", (event) => {
    const index = event.target.dataset && event.target.dataset.index;
    if (index != null && grid && grid.epoch) $("shard-info").textContent = shardTitle(grid.epoch, Number(index));
  });

  // ---- charts (a small SVG line plot: time on x, one or more series on y) ------------------------
  const W = 480, H = 180, M = { left: 48, right: 10, top: 12, bottom: 24 };

  function niceTicks(lo, hi, count) {
    const span = hi - lo || Math.abs(hi) || 1;
    const raw = span / count;
    const step = [1, 2, 2.5, 5, 10].map((f) => f * 10 ** Math.floor(Math.log10(raw))).find((s) => s >= raw);
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  function drawChart(node, times, series, { yFormat = (v) => String(v), yMin, yMax } = {}) {
    const parts = [];
    const values = series.flatMap((s) => s.values.filter((v) => v != null));
    if (times.length < 2 || values.length === 0) {
      parts.push(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, "no data yet"));
      node.replaceChildren(...parts);
      return;
    }
    let lo = yMin != null ? yMin : Math.min(...values);
    let hi = yMax != null ? yMax : Math.max(...values);
    if (hi === lo) { hi += Math.abs(hi) * 0.1 || 1; lo -= yMin != null ? 0 : Math.abs(lo) * 0.1 || 1; }
    const t0 = times[0], t1 = times[times.length - 1];
    const x = (t) => M.left + ((t - t0) / (t1 - t0 || 1)) * (W - M.left - M.right);
    const y = (v) => H - M.bottom - ((v - lo) / (hi - lo)) * (H - M.top - M.bottom);
    for (const tick of niceTicks(lo, hi, 4)) {
      if (tick < lo || tick > hi) continue;
      parts.push(svg("line", { x1: M.left, x2: W - M.right, y1: y(tick), y2: y(tick), class: "rule" }));
      parts.push(svg("text", { x: M.left - 6, y: y(tick) + 4, "text-anchor": "end", class: "tick" }, yFormat(tick)));
    }
    parts.push(svg("text", { x: M.left, y: H - 6, class: "tick" }, fmt.clock(t0)));
    parts.push(svg("text", { x: W - M.right, y: H - 6, "text-anchor": "end", class: "tick" }, fmt.clock(t1)));
    series.forEach((s, k) => {
      let path = "", pen = "M";
      s.values.forEach((v, i) => {
        if (v == null) { pen = "M"; return; }
        path += `${pen}${x(times[i]).toFixed(1)},${y(v).toFixed(1)} `;
        pen = "L";
      });
      parts.push(svg("path", { d: path.trim(), class: "line " + s.cls }));
      if (series.length > 1) {
        const keyY = H - M.bottom - 8 - 14 * (series.length - 1 - k); // bottom right: curves rise away from it
        parts.push(svg("text", { x: W - M.right - 4, y: keyY, "text-anchor": "end", class: "key " + s.cls }, s.name));
      }
    });
    node.replaceChildren(...parts);
  }

  function renderCharts(history) {
    drawChart($("chart-throughput"), history.t, [{ name: "samples/s", values: history.samples_per_s, cls: "s0" }],
      { yMin: 0, yFormat: (v) => (v >= 1000 ? (v / 1000).toFixed(1) + "k" : String(v)) });
    drawChart($("chart-loss"), history.t, [{ name: "loss", values: history.loss, cls: "s1" }],
      { yFormat: (v) => v.toPrecision(3) });
    drawChart($("chart-accuracy"), history.t, [
      { name: "top-1", values: history.val_top1, cls: "s2" },
      { name: "top-5", values: history.val_top5, cls: "s3" },
    ], { yMin: 0, yMax: 1, yFormat: (v) => (100 * v).toFixed(0) + "%" });
  }

  // ---- polling -------------------------------------------------------------------------------------
  let renders = 0;

  function render(state) {
    renderTotals(state);
    renderPeers(state.peers);
    renderShards(state.epoch);
    renderCharts(state.history);
    const status = $("status");
    status.textContent = state.dht_error
      ? `cannot read the DHT: ${state.dht_error}`
      : `updated ${fmt.clock(state.now)}`;
    status.classList.toggle("alert", Boolean(state.dht_error));
    document.body.dataset.renders = String(++renders);
  }

  async function tick() {
    let wait = 2000;
    try {
      const response = await fetch("/api/state", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const state = await response.json();
      render(state);
      wait = Math.max(500, 1000 * state.poll_s);
    } catch (error) {
      $("status").textContent = `cannot reach the monitor (${error.message}); retrying`;
      $("status").classList.add("alert");
    }
    setTimeout(tick, wait);
  }

  tick();
})();
