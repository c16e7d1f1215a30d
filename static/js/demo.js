/* /demo/: Start, Close and Clear over EventSource("/demo/stream/").
 *
 * Every event is a JSON {"value": 1..100, "at": "<iso time>"} with an id.
 * Text only ever goes into the page through textContent / createElement.
 */
(function () {
  "use strict";

  var STREAM_URL = "/demo/stream/";
  var MAX_ROWS = 500;
  var SPARK_POINTS = 40;

  var $ = function (id) { return document.getElementById(id); };
  var els = {
    start: $("start"),
    close: $("close"),
    clear: $("clear"),
    data: $("data"),
    state: $("state"),
    count: $("count"),
    lastId: $("last-id"),
    statLast: $("stat-last"),
    statAvg: $("stat-avg"),
    statMin: $("stat-min"),
    statMax: $("stat-max"),
    spark: $("sparkline"),
  };

  var source = null;
  var lastEventId = "";
  var stats = { count: 0, sum: 0, min: null, max: null, recent: [] };
  var STATES = ["idle", "connecting", "live", "reconnecting", "closed"];

  function setState(name) {
    STATES.forEach(function (s) { els.state.classList.remove("conn-" + s); });
    els.state.classList.add("conn-" + name);
    els.state.textContent = name;
    els.state.dataset.state = name;
  }

  function formatTime(iso) {
    var d = new Date(iso);
    if (isNaN(d.getTime())) return String(iso || "");
    var pad = function (n, w) { return String(n).padStart(w || 2, "0"); };
    return pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds()) +
      "." + pad(d.getMilliseconds(), 3);
  }

  function nearBottom(el) {
    return el.scrollHeight - el.scrollTop - el.clientHeight < 48;
  }

  function addRow(id, payload) {
    var stick = nearBottom(els.data);
    var value = Number(payload && payload.value);
    var valid = Number.isFinite(value);

    var li = document.createElement("li");
    li.className = "stream-row new";
    li.dataset.value = valid ? String(value) : "";

    var seq = document.createElement("span");
    seq.className = "seq";
    seq.textContent = id ? "#" + id : "";

    var time = document.createElement("time");
    if (payload && payload.at) time.dateTime = String(payload.at);
    time.textContent = formatTime(payload && payload.at);

    var val = document.createElement("span");
    val.className = "value";
    val.textContent = valid ? String(value) : String(payload);

    var bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    var fill = document.createElement("span");
    fill.style.width = (valid ? Math.max(0, Math.min(100, value)) : 0) + "%";
    bar.appendChild(fill);

    li.append(seq, time, val, bar);
    els.data.appendChild(li);
    while (els.data.childElementCount > MAX_ROWS) els.data.firstElementChild.remove();
    setTimeout(function () { li.classList.remove("new"); }, 700);
    if (stick) els.data.scrollTop = els.data.scrollHeight;

    if (valid) record(value);
  }

  function record(value) {
    stats.count += 1;
    stats.sum += value;
    stats.min = stats.min === null ? value : Math.min(stats.min, value);
    stats.max = stats.max === null ? value : Math.max(stats.max, value);
    stats.recent.push(value);
    if (stats.recent.length > SPARK_POINTS) stats.recent.shift();
    renderStats(value);
  }

  function renderStats(last) {
    els.count.textContent = String(stats.count);
    els.statLast.textContent = last === undefined ? "–" : String(last);
    els.statAvg.textContent = stats.count ? (stats.sum / stats.count).toFixed(1) : "–";
    els.statMin.textContent = stats.min === null ? "–" : String(stats.min);
    els.statMax.textContent = stats.max === null ? "–" : String(stats.max);
    els.lastId.textContent = lastEventId || "–";
    var bars = stats.recent.map(function (v) {
      var s = document.createElement("span");
      s.style.height = Math.max(4, v) + "%";
      s.title = String(v);
      return s;
    });
    els.spark.replaceChildren.apply(els.spark, bars);
  }

  function start() {
    if (source) return; // idempotent: one connection at a time
    var url = STREAM_URL;
    if (lastEventId) url += "?lastEventId=" + encodeURIComponent(lastEventId);
    setState("connecting");
    var es = new EventSource(url);
    source = es;
    es.onopen = function () {
      if (source === es) setState("live");
    };
    es.onmessage = function (event) {
      if (source !== es) return;
      if (event.lastEventId) lastEventId = event.lastEventId;
      var payload;
      try {
        payload = JSON.parse(event.data);
      } catch (e) {
        payload = event.data;
      }
      addRow(event.lastEventId, payload);
      if (els.state.dataset.state !== "live") setState("live");
    };
    es.addEventListener("reset", function () {
      // The server could not resume from our id; it goes on live.
      lastEventId = "";
    });
    es.onerror = function () {
      if (source !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        source = null;
        setState("closed");
      } else {
        setState("reconnecting");
      }
    };
  }

  function close() {
    if (!source) return;
    source.close();
    source = null;
    setState("closed");
  }

  function clear() {
    els.data.replaceChildren();
    lastEventId = "";
    stats = { count: 0, sum: 0, min: null, max: null, recent: [] };
    renderStats();
  }

  els.start.addEventListener("click", start);
  els.close.addEventListener("click", close);
  els.clear.addEventListener("click", clear);
  window.addEventListener("pagehide", close);

  setState("idle");
  renderStats();
})();
