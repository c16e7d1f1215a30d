/* The notification feed, one connection per browser.
 *
 * Loaded as a SharedWorker by bell.js: it owns the only EventSource to
 * /api/notifications/stream/ and relays every event to all open tabs (ports).
 * Where SharedWorker is missing, bell.js loads this same file as a plain
 * script in the tab elected leader and uses ssechat.createBellFeed() directly.
 *
 * Messages to tabs:
 *   {type: "snapshot", state, unread, lastEventId}   on hello
 *   {type: "state", state}                           connecting | live | reconnecting | idle
 *   {type: "event", event, data, id}                 notification | unread | reset (data parsed)
 *   any message a tab relays to the others (e.g. {type: "read", ids: [...]})
 * Messages from tabs: {type: "hello", position}, {type: "bye"}, {type: "relay", message}.
 *
 * Resume: EventSource reconnects by itself with Last-Event-ID. When it gives
 * up (readyState CLOSED: the server answered an error while restarting) a new
 * one is made with ?lastEventId=<last id seen>, so nothing is lost either way.
 */
(function (global) {
  "use strict";

  var STREAM_URL = "/api/notifications/stream/";
  var EVENTS = ["notification", "unread", "reset"];
  var RETRY_FIRST_MS = 1000;
  var RETRY_MAX_MS = 30000;

  function createFeed(emit) {
    var source = null;
    var retryTimer = null;
    var retryDelay = RETRY_FIRST_MS;
    var state = "idle";
    var unread = null;
    var lastEventId = "";

    function setState(next) {
      if (next === state) return;
      state = next;
      emit({ type: "state", state: next });
    }

    function onEvent(es, type, ev) {
      if (source !== es) return;
      if (ev.lastEventId) lastEventId = ev.lastEventId;
      var data = null;
      try {
        data = JSON.parse(ev.data);
      } catch (e) {
        return;
      }
      if (type === "unread" && data && typeof data.count === "number") unread = data.count;
      // `unread` comes once the backlog is sent: from then on we are live.
      if (type === "unread" || state === "live") {
        retryDelay = RETRY_FIRST_MS;
        setState("live");
      }
      emit({ type: "event", event: type, data: data, id: ev.lastEventId || "" });
    }

    function open(resumeFrom) {
      if (source || retryTimer) return;
      var id = lastEventId || resumeFrom || "";
      var url = STREAM_URL + (id ? "?lastEventId=" + encodeURIComponent(id) : "");
      setState(state === "idle" || state === "connecting" ? "connecting" : "reconnecting");
      var es = new EventSource(url);
      source = es;
      EVENTS.forEach(function (type) {
        es.addEventListener(type, function (ev) { onEvent(es, type, ev); });
      });
      es.onerror = function () {
        if (source !== es) return;
        if (es.readyState === EventSource.CLOSED) {
          // The browser gave up (an error status): make a new one, resuming from our id.
          source = null;
          setState("reconnecting");
          var delay = retryDelay * (0.75 + Math.random() * 0.5);
          retryDelay = Math.min(retryDelay * 2, RETRY_MAX_MS);
          retryTimer = setTimeout(function () {
            retryTimer = null;
            open();
          }, delay);
        } else {
          setState("reconnecting"); // EventSource retries by itself, with Last-Event-ID
        }
      };
    }

    function close() {
      if (source) source.close();
      source = null;
      if (retryTimer) clearTimeout(retryTimer);
      retryTimer = null;
      setState("idle");
    }

    return {
      open: open,
      close: close,
      isOpen: function () { return !!(source || retryTimer); },
      snapshot: function () {
        return { type: "snapshot", state: state, unread: unread, lastEventId: lastEventId };
      },
      setLastEventId: function (id) {
        if (id && !lastEventId) lastEventId = String(id);
      },
    };
  }

  var isSharedWorker =
    typeof global.SharedWorkerGlobalScope !== "undefined" &&
    global instanceof global.SharedWorkerGlobalScope;

  if (!isSharedWorker) {
    (global.ssechat = global.ssechat || {}).createBellFeed = createFeed;
    return;
  }

  // -- SharedWorker: one feed, many tabs -------------------------------------------
  var ports = new Set();
  var idleTimer = null;
  // A tab that navigates leaves and comes back at once: keep the stream a moment.
  var IDLE_CLOSE_MS = 4000;

  function broadcast(msg, except) {
    ports.forEach(function (port) {
      if (port === except) return;
      try {
        port.postMessage(msg);
      } catch (e) {
        ports.delete(port);
      }
    });
  }

  var feed = createFeed(function (msg) { broadcast(msg); });

  global.onconnect = function (e) {
    var port = e.ports[0];
    port.onmessage = function (m) {
      var msg = m.data || {};
      if (msg.type === "hello") {
        ports.add(port);
        if (idleTimer) {
          clearTimeout(idleTimer);
          idleTimer = null;
        }
        port.postMessage(feed.snapshot());
        // A freshly rendered page knows where its own data stops: start there.
        if (!feed.isOpen()) feed.open(msg.position || "");
      } else if (msg.type === "bye") {
        ports.delete(port);
        if (!ports.size && !idleTimer) {
          idleTimer = setTimeout(function () {
            idleTimer = null;
            if (!ports.size) feed.close();
          }, IDLE_CLOSE_MS);
        }
      } else if (msg.type === "relay" && msg.message) {
        broadcast(msg.message, port);
      }
    };
    port.start();
  };
})(self);
