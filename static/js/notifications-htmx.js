/* /notifications/htmx/: what the htmx page adds to htmx's SSE extension.
 *
 * 1. Resume. The extension re-creates its EventSource from the sse-connect URL
 *    as written when the old one is closed (an open issue of the extension),
 *    without Last-Event-ID, so whatever was sent meanwhile would be lost. We
 *    keep the last event id seen and give it to the new EventSource as
 *    ?lastEventId= (htmx.createEventSource is the extension's hook for this).
 * 2. One row per notification: a notification sent again replaces its row.
 * 3. After a `reset` (the server could not resume from our id), the list is
 *    loaded again.
 * 4. The connection state pill, and local times.
 */
(function () {
  "use strict";

  if (!window.htmx) return;
  var lastId = "";
  var STATE_TEXT = { connecting: "Connecting…", live: "Live", reconnecting: "Reconnecting…" };

  function withLastId(url) {
    if (!lastId) return url;
    var u = new URL(url, location.href);
    u.searchParams.set("lastEventId", lastId);
    return u.pathname + u.search;
  }

  htmx.createEventSource = function (url) {
    return new EventSource(withLastId(url), { withCredentials: true });
  };

  function remember(ev) {
    if (ev.lastEventId) lastId = ev.lastEventId;
  }

  function setConn(state) {
    var pill = document.getElementById("conn-state");
    if (!pill || pill.getAttribute("data-state") === state) return;
    pill.className = "pill conn-" + state;
    pill.textContent = STATE_TEXT[state];
    pill.setAttribute("data-state", state);
  }

  document.addEventListener("htmx:sseOpen", function (e) {
    var source = e.detail && e.detail.source;
    if (!source || source.ssechatTracked) return;
    source.ssechatTracked = true;
    ["notification", "unread", "reset"].forEach(function (type) {
      source.addEventListener(type, remember);
    });
    // `unread` is sent once the backlog is through: that is when we are live.
    source.addEventListener("unread", function () { setConn("live"); });
    source.addEventListener("reset", function () {
      var list = document.getElementById("notif-list");
      if (list) htmx.ajax("GET", list.getAttribute("data-reload-url"), { target: list, swap: "innerHTML" });
    });
  });

  document.addEventListener("htmx:sseError", function () { setConn("reconnecting"); });

  document.addEventListener("htmx:sseBeforeMessage", function (e) {
    var match = /data-notification-id="(\d+)"/.exec((e.detail && e.detail.data) || "");
    if (!match) return;
    var old = document.getElementById("notification-" + match[1]);
    if (old) old.remove();
  });

  var timeFmt = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
  function localTimes(root) {
    (root || document).querySelectorAll("time[datetime]").forEach(function (t) {
      var d = new Date(t.dateTime);
      if (!isNaN(d.getTime())) t.textContent = timeFmt.format(d);
    });
  }
  document.addEventListener("htmx:load", function (e) { localTimes(e.target); });
})();
