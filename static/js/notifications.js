/* /notifications/: the list over the JSON API, live over the bell's shared connection.
 *
 * History comes from GET /api/notifications/ (paged with before=<id>); new
 * notifications come from window.ssechat.bell (the one stream all tabs share,
 * see bell.js), so this page opens no stream of its own. Rows are kept in id
 * order, newest first, and each id appears once whatever the order in which
 * the list and the stream deliver it. Model text only goes in as textContent.
 */
(function () {
  "use strict";

  var ns = window.ssechat || {};
  var bell = ns.bell;
  var $ = function (id) { return document.getElementById(id); };
  var page = $("notif-page");
  if (!page || !bell) return;

  var PAGE = Number(page.getAttribute("data-page-size")) || 20;
  var els = {
    list: $("notif-list"),
    empty: $("notif-empty"),
    emptyTitle: $("notif-empty-title"),
    emptyText: $("notif-empty-text"),
    error: $("notif-error"),
    more: $("load-more"),
    markAll: $("mark-all"),
    conn: $("conn-state"),
    summary: $("unread-summary"),
    tabCount: $("tab-unread-count"),
    topic: $("topic-filter"),
    tabs: Array.prototype.slice.call(document.querySelectorAll(".notif-toolbar .tab")),
    icons: $("notif-icons"),
  };

  var view = { filter: "all", topic: "" };
  var rows = new Map(); // id -> {n, el}
  var oldest = null;
  var generation = 0;
  var loaded = false;
  var unread = Number(els.summary.getAttribute("data-count")) || 0;
  var STATE_TEXT = { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…" };

  // -- rendering ------------------------------------------------------------------------
  var LEVELS = ["info", "success", "warning", "error"];
  function icon(level) {
    // Only known levels reach the selector: stored data must never build a query.
    var known = LEVELS.indexOf(level) >= 0 ? level : "info";
    var holder = els.icons.content.querySelector('[data-level="' + known + '"]');
    return holder.firstElementChild.cloneNode(true);
  }

  var timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
  var dayFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
  var yearFmt = new Intl.DateTimeFormat(undefined, { year: "numeric", month: "short", day: "numeric" });
  var fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: "full", timeStyle: "medium" });

  function relativeTime(date) {
    var seconds = (Date.now() - date.getTime()) / 1000;
    if (seconds < 45) return "just now";
    if (seconds < 3600) return Math.max(1, Math.round(seconds / 60)) + " min ago";
    var today = new Date();
    if (date.toDateString() === today.toDateString()) return timeFmt.format(date);
    var yesterday = new Date(today.getTime() - 86400000);
    if (date.toDateString() === yesterday.toDateString()) return "Yesterday, " + timeFmt.format(date);
    if (date.getFullYear() === today.getFullYear()) return dayFmt.format(date) + ", " + timeFmt.format(date);
    return yearFmt.format(date);
  }

  function buildRow(n) {
    var li = document.createElement("li");
    li.className = "notif level-" + (n.level || "info") + (n.read ? "" : " unread");
    li.id = "notification-" + n.id;
    li.setAttribute("data-notification-id", String(n.id));
    li.setAttribute("data-topic", n.topic || "");

    var iconBox = document.createElement("div");
    iconBox.className = "notif-icon";
    iconBox.title = n.level || "info";
    iconBox.appendChild(icon(n.level));

    var content = document.createElement("div");
    content.className = "notif-content";
    var title = document.createElement("p");
    title.className = "notif-title";
    if (ns.isSafeLink && ns.isSafeLink(n.url)) {
      var a = document.createElement("a");
      a.href = n.url;
      a.textContent = n.title;
      if (n.url.charAt(0) !== "/") {
        a.target = "_blank";
        a.rel = "noopener noreferrer";
      }
      a.addEventListener("click", function (ev) { onLinkClick(ev, n, a); });
      title.appendChild(a);
    } else {
      title.textContent = n.title;
    }
    content.appendChild(title);
    if (n.body) {
      var body = document.createElement("p");
      body.className = "notif-body";
      body.textContent = n.body;
      content.appendChild(body);
    }
    var meta = document.createElement("div");
    meta.className = "notif-meta";
    var topic = document.createElement("span");
    topic.className = "notif-topic";
    topic.textContent = n.topic || "general";
    meta.appendChild(topic);
    var created = new Date(n.created_at);
    if (!isNaN(created.getTime())) {
      var time = document.createElement("time");
      time.dateTime = n.created_at;
      time.title = fullFmt.format(created);
      time.textContent = relativeTime(created);
      meta.appendChild(time);
    }
    content.appendChild(meta);

    var actions = document.createElement("div");
    actions.className = "notif-actions";
    var btn = document.createElement("button");
    btn.type = "button";
    btn.className = "btn btn-ghost btn-sm btn-icon notif-read-btn";
    btn.title = "Mark as read";
    btn.setAttribute("aria-label", "Mark “" + n.title + "” as read");
    btn.appendChild(checkIcon());
    btn.addEventListener("click", function () { markRead(n.id); });
    actions.appendChild(btn);

    li.append(iconBox, content, actions);
    return li;
  }

  function checkIcon() {
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("fill", "none");
    svg.setAttribute("stroke", "currentColor");
    svg.setAttribute("stroke-width", "2");
    svg.setAttribute("stroke-linecap", "round");
    svg.setAttribute("stroke-linejoin", "round");
    svg.setAttribute("aria-hidden", "true");
    var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", "M20 6 9 17l-5-5");
    svg.appendChild(path);
    return svg;
  }

  function setRead(id, read) {
    var row = rows.get(id);
    if (!row) return;
    row.n.read = read;
    row.el.classList.toggle("unread", !read);
  }

  function matches(n) {
    if (view.topic && n.topic !== view.topic) return false;
    if (view.filter === "unread" && n.read) return false;
    return true;
  }

  // Keep rows in id order, newest first; one row per id.
  function place(n, live) {
    var existing = rows.get(n.id);
    if (existing) {
      existing.el.remove();
      rows.delete(n.id);
    }
    if (!matches(n)) return;
    var el = buildRow(n);
    if (live) el.classList.add("notif-new");
    var next = null;
    for (var child = els.list.firstElementChild; child; child = child.nextElementSibling) {
      var id = Number(child.getAttribute("data-notification-id"));
      if (id && id < n.id) {
        next = child;
        break;
      }
    }
    els.list.insertBefore(el, next);
    rows.set(n.id, { n: n, el: el });
  }

  function updateEmpty() {
    var none = loaded && rows.size === 0;
    els.empty.hidden = !none;
    if (none) {
      if (view.filter === "unread") {
        els.emptyTitle.textContent = "You're all caught up";
        els.emptyText.textContent = "No unread notifications" + (view.topic ? " in " + view.topic : "") + ".";
      } else if (view.topic) {
        els.emptyTitle.textContent = "Nothing in " + view.topic;
        els.emptyText.textContent = "Notifications on this topic will appear here.";
      } else {
        els.emptyTitle.textContent = "No notifications yet";
        els.emptyText.textContent = "New ones appear here as they arrive, no reload needed.";
      }
    }
  }

  function setUnread(count) {
    if (typeof count !== "number") return;
    unread = count;
    els.summary.setAttribute("data-count", String(count));
    els.summary.replaceChildren();
    if (count) {
      var strong = document.createElement("strong");
      strong.textContent = String(count);
      els.summary.append(strong, " unread");
    } else {
      els.summary.textContent = "You're all caught up";
    }
    els.tabCount.textContent = String(count);
    els.tabCount.hidden = count === 0;
    els.markAll.disabled = count === 0;
  }

  function setConn(state) {
    var name = STATE_TEXT[state] ? state : "connecting";
    els.conn.className = "pill conn-" + name;
    els.conn.textContent = STATE_TEXT[name];
    els.conn.setAttribute("data-state", name);
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = !message;
  }

  function addTopicOption(topic) {
    if (!topic) return;
    for (var i = 0; i < els.topic.options.length; i++) {
      if (els.topic.options[i].value === topic) return;
    }
    var option = document.createElement("option");
    option.value = topic;
    option.textContent = topic;
    els.topic.appendChild(option);
  }

  // -- loading ---------------------------------------------------------------------------
  function query(extra) {
    var params = new URLSearchParams({ limit: String(PAGE) });
    if (view.filter === "unread") params.set("unread", "true");
    if (view.topic) params.set("topic", view.topic);
    Object.keys(extra || {}).forEach(function (k) { params.set(k, String(extra[k])); });
    return "/api/notifications/?" + params.toString();
  }

  async function load(reset) {
    if (reset) {
      generation += 1;
      rows.forEach(function (row) { row.el.remove(); }); // a first skeleton stays until the data
      rows.clear();
      oldest = null;
      loaded = false;
      els.more.hidden = true;
    }
    var gen = generation;
    els.list.setAttribute("aria-busy", "true");
    els.more.disabled = true;
    try {
      var res = await ns.fetchJSON(query(oldest ? { before: oldest } : null));
      if (gen !== generation) return;
      showError("");
      els.list.querySelectorAll(".notif-skeleton").forEach(function (s) { s.remove(); });
      res.results.forEach(function (n) {
        // A row the stream placed first keeps its place; the read state is the server's now.
        if (!rows.has(n.id)) place(n, false);
        else setRead(n.id, n.read);
        addTopicOption(n.topic);
      });
      if (res.results.length) oldest = res.results[res.results.length - 1].id;
      els.more.hidden = res.results.length < PAGE;
      loaded = true;
      setUnread(res.unread_count);
      updateEmpty();
    } catch (err) {
      if (gen === generation) showError("Could not load notifications: " + err.message);
    } finally {
      if (gen === generation) {
        els.list.setAttribute("aria-busy", "false");
        els.more.disabled = false;
      }
    }
  }

  // Another tab or process changed read state: refresh the flags of the rows shown.
  var reconcileTimer = null;
  function reconcileSoon() {
    if (reconcileTimer) clearTimeout(reconcileTimer);
    reconcileTimer = setTimeout(async function () {
      reconcileTimer = null;
      if (!rows.size) return;
      try {
        var params = new URLSearchParams({ limit: String(Math.min(100, Math.max(PAGE, rows.size))) });
        if (view.topic) params.set("topic", view.topic);
        var res = await ns.fetchJSON("/api/notifications/?" + params.toString());
        res.results.forEach(function (n) { setRead(n.id, n.read); });
      } catch (e) {
        /* the next change tries again */
      }
    }, 250);
  }

  // -- actions ---------------------------------------------------------------------------
  async function markRead(id) {
    var row = rows.get(id);
    var was = row && row.n.read;
    setRead(id, true);
    try {
      var res = await bell.markRead(id);
      setUnread(res.unread_count);
      showError("");
    } catch (err) {
      setRead(id, was);
      showError("Could not mark it read: " + err.message);
    }
  }

  function onLinkClick(ev, n, a) {
    if (n.read) return;
    if (a.target === "_blank" || ev.metaKey || ev.ctrlKey || ev.shiftKey || ev.button !== 0) {
      markRead(n.id);
      return;
    }
    // Same tab: record the read before leaving (at most half a second).
    ev.preventDefault();
    var go = function () { location.href = a.href; };
    Promise.race([markRead(n.id), new Promise(function (r) { setTimeout(r, 500); })]).then(go, go);
  }

  els.markAll.addEventListener("click", async function () {
    els.markAll.disabled = true;
    try {
      var res = await bell.markAllRead();
      rows.forEach(function (row, id) { setRead(id, true); });
      setUnread(res.unread_count);
      showError("");
    } catch (err) {
      els.markAll.disabled = false;
      showError("Could not mark all read: " + err.message);
    }
  });

  els.more.addEventListener("click", function () { load(false); });

  els.tabs.forEach(function (tab) {
    tab.addEventListener("click", function () {
      var filter = tab.getAttribute("data-filter");
      if (filter === view.filter) return;
      view.filter = filter;
      els.tabs.forEach(function (t) { t.setAttribute("aria-selected", String(t === tab)); });
      load(true);
    });
  });

  els.topic.addEventListener("change", function () {
    view.topic = els.topic.value;
    load(true);
  });

  // -- live ------------------------------------------------------------------------------
  bell.on("notification", function (e) {
    var n = e.data;
    if (!n || typeof n.id !== "number") return;
    addTopicOption(n.topic);
    var shown = rows.get(n.id);
    place(n, true);
    // Sent again (unread) or an older event replayed over a newer list: ask the server.
    if (shown && shown.n.read && !n.read) reconcileSoon();
    updateEmpty();
  });
  bell.on("unread", function (e) {
    var count = e.data && e.data.count;
    if (typeof count !== "number") return;
    if (count < unread) reconcileSoon();
    setUnread(count);
  });
  bell.on("read", function (msg) {
    if (msg.all) rows.forEach(function (row, id) { setRead(id, true); });
    (msg.ids || []).forEach(function (id) { setRead(id, true); });
  });
  bell.on("reset", function () { load(true); });
  bell.on("state", function (e) { setConn(e.state); });
  setConn(bell.state);
  if (typeof bell.unread === "number") setUnread(bell.unread);

  setInterval(function () {
    els.list.querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.dateTime);
      if (!isNaN(d.getTime())) t.textContent = relativeTime(d);
    });
  }, 30000);

  load(true);
})();
