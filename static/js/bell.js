/* The bell in the page header: unread badge, connection dot, toasts.
 *
 * Every tab of the site shares ONE connection to /api/notifications/stream/
 * (over HTTP/1.1 a browser opens at most six to a host, so a stream per tab
 * would freeze the seventh tab):
 *   1. a SharedWorker (bell-worker.js) owns the EventSource and relays events;
 *   2. without SharedWorker, the tabs elect a leader (Web Locks, else a
 *      localStorage lease) that owns it and relays over BroadcastChannel;
 *   3. without BroadcastChannel, each tab has its own connection.
 *
 * Pages use the same connection through window.ssechat.bell:
 *   bell.on(type, fn) / bell.off(type, fn)   type: notification | unread | reset | state | read
 *       fn({data, id}) for stream events, fn({state}) for state, fn(message) for relayed ones
 *   bell.state, bell.unread, bell.lastEventId, bell.mode ("worker" | "leader" | "follower" | "solo")
 *   bell.relay(message)                      send {type, ...} to the other tabs of this browser
 *   bell.markRead(id), bell.markAllRead()    POST, then tell the other tabs
 * The same events are dispatched on document as "ssechat:<type>" CustomEvents.
 */
(function () {
  "use strict";

  var ns = (window.ssechat = window.ssechat || {});
  var el = document.querySelector("[data-bell]");
  if (!el || ns.bell) return;

  var badge = el.querySelector(".badge");
  var user = el.getAttribute("data-user") || "0";
  var workerUrl = el.getAttribute("data-worker") || "/static/js/bell-worker.js";
  var CHANNEL = "ssechat-bell-" + user;
  var STATE_LABELS = { connecting: "connecting…", live: "live", reconnecting: "reconnecting…", idle: "offline" };
  var listeners = {};

  var bell = (ns.bell = {
    state: "connecting",
    unread: null,
    lastEventId: "",
    mode: "",
    on: function (type, fn) {
      (listeners[type] = listeners[type] || []).push(fn);
    },
    off: function (type, fn) {
      listeners[type] = (listeners[type] || []).filter(function (f) { return f !== fn; });
    },
    relay: function (message) {
      transport.relay(message);
    },
    markRead: async function (id) {
      var res = await ns.fetchJSON("/api/notifications/" + encodeURIComponent(id) + "/read/", {
        method: "POST",
        body: {},
      });
      bell.relay({ type: "read", ids: [id] });
      setUnread(res.unread_count);
      return res;
    },
    markAllRead: async function () {
      var res = await ns.fetchJSON("/api/notifications/read-all/", { method: "POST", body: {} });
      bell.relay({ type: "read", all: true });
      setUnread(res.unread_count);
      return res;
    },
  });

  function emit(type, detail) {
    (listeners[type] || []).slice().forEach(function (fn) {
      try {
        fn(detail);
      } catch (e) {
        console.error(e);
      }
    });
    document.dispatchEvent(new CustomEvent("ssechat:" + type, { detail: detail }));
  }

  // -- the bell itself -------------------------------------------------------------
  function setUnread(count) {
    if (typeof count !== "number" || count < 0) return;
    var changed = count !== bell.unread;
    bell.unread = count;
    badge.textContent = count > 99 ? "99+" : String(count);
    badge.hidden = count === 0;
    el.setAttribute("data-unread", String(count));
    label();
    if (changed) el.classList.toggle("has-unread", count > 0);
  }

  function setState(state) {
    if (!state || state === bell.state) return;
    bell.state = state;
    el.setAttribute("data-state", state);
    label();
    emit("state", { state: state });
  }

  function label() {
    var text = "Notifications";
    if (bell.unread) text += ", " + bell.unread + " unread";
    text += " (" + (STATE_LABELS[bell.state] || bell.state) + ")";
    el.setAttribute("aria-label", text);
    el.title = text;
  }

  // -- toasts (not on the notifications pages, which show the list itself) ----------
  var onInboxPage = /^\/notifications\//.test(location.pathname);
  var toastBox = null;

  function toast(n) {
    if (onInboxPage || document.visibilityState !== "visible" || !n || !n.title) return;
    if (!toastBox) {
      toastBox = document.createElement("div");
      toastBox.className = "toasts";
      toastBox.setAttribute("role", "status");
      toastBox.setAttribute("aria-live", "polite");
      document.body.appendChild(toastBox);
    }
    var item = document.createElement("div");
    item.className = "toast notif-toast level-" + (n.level || "info");
    item.setAttribute("data-notification-id", String(n.id));
    var link = document.createElement("a");
    link.className = "notif-toast-link";
    link.href = isSafeLink(n.url) ? n.url : "/notifications/";
    var title = document.createElement("strong");
    title.className = "notif-toast-title";
    title.textContent = n.title;
    link.appendChild(title);
    if (n.body) {
      var body = document.createElement("span");
      body.className = "notif-toast-body";
      body.textContent = n.body.length > 140 ? n.body.slice(0, 139) + "…" : n.body;
      link.appendChild(body);
    }
    var close = document.createElement("button");
    close.type = "button";
    close.className = "notif-toast-close";
    close.setAttribute("aria-label", "Dismiss");
    close.textContent = "×";
    close.addEventListener("click", function () { dismiss(item); });
    item.append(link, close);
    toastBox.appendChild(item);
    while (toastBox.childElementCount > 3) toastBox.firstElementChild.remove();
    setTimeout(function () { dismiss(item); }, 6000);
  }

  function dismiss(item) {
    if (!item.isConnected || item.classList.contains("leaving")) return;
    item.classList.add("leaving");
    setTimeout(function () { item.remove(); }, 300);
  }

  // Toasts of notifications read meanwhile (here or in another tab) go away.
  function dismissRead(ids) {
    if (!toastBox) return;
    toastBox.querySelectorAll(".notif-toast").forEach(function (item) {
      var id = Number(item.getAttribute("data-notification-id"));
      if (!ids || ids.indexOf(id) >= 0) dismiss(item);
    });
  }

  function isSafeLink(url) {
    if (typeof url !== "string" || !url) return false;
    if (url.charAt(0) === "/") return url.charAt(1) !== "/" && url.indexOf("\\") < 0;
    return /^https?:\/\/[^\s]+$/i.test(url);
  }
  ns.isSafeLink = isSafeLink;

  // -- messages from the feed (whatever transport) -------------------------------------
  function handle(msg) {
    if (!msg || typeof msg !== "object") return;
    if (msg.type === "snapshot") {
      if (msg.lastEventId) bell.lastEventId = msg.lastEventId;
      if (typeof msg.unread === "number") setUnread(msg.unread);
      setState(msg.state === "idle" ? "connecting" : msg.state);
    } else if (msg.type === "state") {
      setState(msg.state === "idle" ? "connecting" : msg.state);
    } else if (msg.type === "event") {
      if (msg.id) bell.lastEventId = msg.id;
      if (msg.event === "unread" && msg.data) {
        setUnread(msg.data.count);
        if (msg.data.count === 0) dismissRead(null);
      }
      if (msg.event === "notification") toast(msg.data);
      emit(msg.event, { data: msg.data, id: msg.id });
    } else if (msg.type) {
      if (msg.type === "read") dismissRead(msg.all ? null : msg.ids || []);
      emit(msg.type, msg); // relayed between tabs, e.g. {type: "read", ids}
    }
  }

  // A page rendered moments ago knows the stream position its data stops at.
  function freshPosition() {
    var position = el.getAttribute("data-position") || "";
    return performance.now() < 60000 ? position : "";
  }

  // -- transports ---------------------------------------------------------------------
  var transport = { relay: function () {} };

  function startWorker() {
    var worker = new SharedWorker(workerUrl, { name: "ssechat-bell-v1-" + user });
    var port = worker.port;
    var failed = false;
    worker.onerror = function () {
      if (failed) return;
      failed = true;
      console.warn("notifications: shared worker failed; electing a leader tab instead");
      startElected();
    };
    port.onmessage = function (e) {
      if (!failed) handle(e.data);
    };
    port.start();
    var hello = function () { port.postMessage({ type: "hello", position: freshPosition() }); };
    hello();
    window.addEventListener("pagehide", function () { port.postMessage({ type: "bye" }); });
    window.addEventListener("pageshow", function (e) { if (e.persisted) hello(); });
    bell.mode = "worker";
    transport = {
      relay: function (message) {
        if (failed) return;
        port.postMessage({ type: "relay", message: message });
      },
    };
  }

  function loadFeedScript(done) {
    if (ns.createBellFeed) return done();
    var s = document.createElement("script");
    s.src = workerUrl;
    s.onload = done;
    s.onerror = function () { console.error("notifications: could not load " + workerUrl); };
    document.head.appendChild(s);
  }

  // Without SharedWorker: one tab leads (owns the EventSource), the others follow.
  function startElected() {
    var bc = "BroadcastChannel" in window ? new BroadcastChannel(CHANNEL) : null;
    var feed = null;

    function lead() {
      if (feed) return;
      bell.mode = bc ? "leader" : "solo";
      loadFeedScript(function () {
        feed = ns.createBellFeed(function (msg) {
          if (bc) bc.postMessage(msg);
          handle(msg);
        });
        if (bell.lastEventId) feed.setLastEventId(bell.lastEventId);
        feed.open(freshPosition());
      });
    }

    function stepDown() {
      if (!feed) return;
      feed.close();
      feed = null;
      bell.mode = "follower";
    }

    transport = {
      relay: function (message) {
        if (bc) bc.postMessage({ type: "relay", message: message });
      },
    };
    if (!bc) return lead();

    bell.mode = "follower";
    bc.onmessage = function (e) {
      var msg = e.data || {};
      if (msg.type === "hello") {
        if (feed) bc.postMessage(feed.snapshot());
      } else if (msg.type === "relay") {
        handle(msg.message);
      } else if (msg.type === "leader-gone") {
        if (!feed && lease) lease.claim();
      } else if (!feed) {
        handle(msg); // the leader's events, state and snapshots
      }
    };
    bc.postMessage({ type: "hello" });

    var lease = null;
    if (navigator.locks && navigator.locks.request) {
      // The lock is held until this tab goes away; the next waiting tab then leads.
      navigator.locks.request(CHANNEL, function () {
        lead();
        return new Promise(function () {});
      });
    } else {
      lease = localStorageLease(CHANNEL, lead, stepDown);
    }
    window.addEventListener("pagehide", function () {
      if (feed) {
        stepDown();
        if (lease) lease.release();
        bc.postMessage({ type: "leader-gone" });
      }
    });
  }

  // A leader lease in localStorage: renewed every 2 s, taken over when 6 s old.
  function localStorageLease(key, onLead, onLose) {
    var me = Math.random().toString(36).slice(2);
    var TTL = 6000;
    var leading = false;
    function read() {
      try {
        return JSON.parse(localStorage.getItem(key) || "null");
      } catch (e) {
        return null;
      }
    }
    function write() {
      try {
        localStorage.setItem(key, JSON.stringify({ id: me, until: Date.now() + TTL }));
      } catch (e) {
        /* storage full or blocked: lead anyway */
      }
    }
    function claim() {
      var cur = read();
      if (cur && cur.id !== me && cur.until > Date.now()) return;
      write();
      // Two tabs may write at once: the last writer wins, the other backs off.
      setTimeout(function () {
        var now = read();
        if (!now || now.id === me) {
          if (!leading) {
            leading = true;
            onLead();
          }
        }
      }, 60);
    }
    function tick() {
      if (leading) {
        var cur = read();
        if (cur && cur.id !== me) {
          leading = false;
          onLose();
          return;
        }
        write();
      } else {
        claim();
      }
    }
    claim();
    setInterval(tick, 2000);
    return {
      claim: claim,
      release: function () {
        var cur = read();
        if (cur && cur.id === me) localStorage.removeItem(key);
        leading = false;
      },
    };
  }

  var rendered = el.getAttribute("data-unread");
  if (rendered) setUnread(Number(rendered));
  label();
  try {
    if (typeof SharedWorker === "function") startWorker();
    else startElected();
  } catch (e) {
    console.warn("notifications: shared worker unavailable (" + e + "); electing a leader tab");
    startElected();
  }
})();
