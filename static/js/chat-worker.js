/* The chat page's connection hub: one per browser, shared by every /chat/ tab.
 *
 * Browsers allow six HTTP/1.1 connections per host, shared by all tabs, and the
 * notifications bell needs one of them. Ten chat tabs with a stream each would
 * starve everything, so the streams live here, in a SharedWorker, and the tabs
 * talk to it over a MessagePort. The hub holds at most MAX_STREAMS streams:
 *
 * - one conversation stream (`/api/chat/conversations/<id>/stream/`) for the
 *   conversation of the tab the user touched last; every tab looking at that
 *   conversation gets its `message` snapshots and answer text from it;
 * - message streams (`/api/chat/messages/<id>/stream/`) for answers that are
 *   still being written and that no open conversation stream covers exactly:
 *   after a reload mid-answer, a late tab, or a tab whose conversation is not
 *   the focused one. A message stream starts at the beginning of the answer,
 *   so its text is exact; it ends with `done`.
 *
 * Exactness: the text of an answer that the hub hands out is always a prefix of
 * the final text, never with a repeat or a hole. It comes from exactly one
 * source: the conversation stream, when that stream saw the answer's creation
 * snapshot (every later delta is then on it, and EventSource resumes it with
 * Last-Event-ID), or else a message stream read from the start.
 *
 * Protocol (tab -> hub):
 *   {type: "hello", tab, hidden}          first message; the tab holds a Web Lock
 *                                          named "ssechat-chat-tab:<tab>" while alive
 *   {type: "view", conversation}          the tab shows this conversation (or null)
 *   {type: "streaming", conversation, ids} answers the tab believes are streaming
 *   {type: "active"} / {type: "visibility", hidden} / {type: "bye"}
 * (hub -> tab):
 *   {type: "message", conversation, message}   a Message snapshot (upsert by id)
 *   {type: "text", conversation, id, text}     the whole text of a streaming answer so far
 *   {type: "delta", conversation, id, text}    more text, after a "text" for that id
 *   {type: "state", conversation, state}       "live" | "connecting" | "reconnecting" | "idle"
 *   {type: "resync", conversation}             reload the conversation over the JSON API
 *
 * Loaded as a plain script in a page (browsers without SharedWorker), it only
 * defines `self.ssechatChatHub`; the page then runs a hub of its own.
 */
(function (scope) {
  "use strict";

  var MAX_STREAMS = 3; // conversation + message streams held at once (the bell has its own)
  var HIDDEN_GRACE_MS = 20000; // a hidden tab keeps its streams this long
  var SNAPSHOT_GRACE_MS = 1500; // wait this long for a new answer's creation snapshot
  var SETTLE_MS = 400; // a fresh stream is surely subscribed this long after `open`
  var KEEP_FINISHED_MS = 120000;
  var MAX_RETRY_MS = 15000;

  function Hub(options) {
    options = options || {};
    this.pageMode = !!options.pageMode;
    this.ports = new Map(); // tab id -> port record
    this.convs = new Map(); // conversation id -> conversation stream record
    this.msgs = new Map(); // message id -> answer record
    this.planTimer = null;
    this.seq = 0;
  }

  Hub.prototype.connect = function (port) {
    var hub = this;
    var rec = {
      id: "p" + ++hub.seq,
      port: port,
      conv: null,
      activeAt: Date.now(),
      hidden: false,
      hiddenAt: 0,
      synced: new Set(),
    };
    port.onmessage = function (event) {
      hub.onPortMessage(rec, event.data || {});
    };
    if (port.start) port.start();
  };

  Hub.prototype.onPortMessage = function (rec, msg) {
    var hub = this;
    switch (msg.type) {
      case "hello":
        hub.ports.delete(rec.id);
        rec.id = String(msg.tab || rec.id);
        rec.hidden = !!msg.hidden;
        rec.hiddenAt = rec.hidden ? Date.now() : 0;
        hub.ports.set(rec.id, rec);
        // The tab holds a lock while it lives: getting it means the tab is gone.
        if (!hub.pageMode && scope.navigator && scope.navigator.locks) {
          scope.navigator.locks
            .request("ssechat-chat-tab:" + rec.id, function () {
              hub.drop(rec);
            })
            .catch(function () {});
        }
        break;
      case "view":
        rec.conv = msg.conversation == null ? null : Number(msg.conversation);
        rec.activeAt = Date.now();
        rec.synced = new Set();
        if (rec.conv != null) hub.sendConvState(rec);
        break;
      case "streaming":
        hub.onStreaming(rec, Number(msg.conversation), msg.ids || []);
        break;
      case "active":
        rec.activeAt = Date.now();
        break;
      case "visibility":
        rec.hidden = !!msg.hidden;
        rec.hiddenAt = rec.hidden ? Date.now() : 0;
        if (!rec.hidden) rec.activeAt = Date.now();
        break;
      case "bye":
        hub.drop(rec);
        return;
    }
    hub.schedule();
  };

  Hub.prototype.drop = function (rec) {
    if (this.ports.get(rec.id) === rec) this.ports.delete(rec.id);
    rec.conv = null;
    this.schedule();
  };

  Hub.prototype.post = function (rec, data) {
    try {
      rec.port.postMessage(data);
    } catch (e) {
      this.drop(rec);
    }
  };

  Hub.prototype.viewers = function (convId) {
    var out = [];
    this.ports.forEach(function (rec) {
      if (rec.conv === convId) out.push(rec);
    });
    return out;
  };

  Hub.prototype.broadcast = function (convId, data) {
    var hub = this;
    hub.viewers(convId).forEach(function (rec) {
      hub.post(rec, data);
    });
  };

  /* ------------------------------------------------------------ answers */

  Hub.prototype.answer = function (id, convId) {
    var m = this.msgs.get(id);
    if (!m) {
      m = { id: id, conv: convId, text: "", source: null, final: null, es: null, lastId: null, waitUntil: 0, retry: 0, timer: null };
      this.msgs.set(id, m);
      this.unsync(m); // a tab may hold text of an earlier record of this answer
    }
    return m;
  };

  // Send the answer's text to the tabs looking at it: the whole text to a tab
  // that has not had it yet, else just the new piece.
  Hub.prototype.emit = function (m, piece) {
    var hub = this;
    if (m.final || !m.source) return;
    hub.viewers(m.conv).forEach(function (rec) {
      if (rec.synced.has(m.id)) {
        if (piece) hub.post(rec, { type: "delta", conversation: m.conv, id: m.id, text: piece });
      } else {
        rec.synced.add(m.id);
        hub.post(rec, { type: "text", conversation: m.conv, id: m.id, text: m.text });
      }
    });
  };

  Hub.prototype.unsync = function (m) {
    this.ports.forEach(function (rec) {
      rec.synced.delete(m.id);
    });
  };

  Hub.prototype.finish = function (m, message) {
    var hub = this;
    if (m.final) return;
    m.final = message;
    hub.closeAnswerStream(m);
    hub.broadcast(m.conv, { type: "message", conversation: m.conv, message: message });
    setTimeout(function () {
      if (hub.msgs.get(m.id) === m) hub.msgs.delete(m.id);
    }, KEEP_FINISHED_MS);
    hub.schedule();
  };

  Hub.prototype.onStreaming = function (rec, convId, ids) {
    var hub = this;
    var conv = hub.convs.get(convId);
    ids.forEach(function (raw) {
      var id = Number(raw);
      if (!id) return;
      var m = hub.msgs.get(id);
      if (m && m.final) {
        hub.post(rec, { type: "message", conversation: convId, message: m.final });
        return;
      }
      if (!m) {
        m = hub.answer(id, convId);
        // A conversation stream that is surely subscribed will bring the creation
        // snapshot of a just-created answer: give it a moment before a message stream.
        if (conv && conv.es && conv.settled) m.waitUntil = Date.now() + SNAPSHOT_GRACE_MS;
      }
      if (m.source && !rec.synced.has(id)) {
        rec.synced.add(id);
        hub.post(rec, { type: "text", conversation: convId, id: id, text: m.text });
      }
    });
  };

  /* ------------------------------------------------- conversation streams */

  Hub.prototype.conv = function (id) {
    var c = this.convs.get(id);
    if (!c) {
      c = { id: id, es: null, lastId: null, state: "idle", settled: false, retry: 0, timer: null, told: false };
      this.convs.set(id, c);
    }
    return c;
  };

  Hub.prototype.setConvState = function (c, state) {
    if (c.state === state) return;
    c.state = state;
    this.broadcast(c.id, { type: "state", conversation: c.id, state: state });
  };

  Hub.prototype.sendConvState = function (rec) {
    var c = this.convs.get(rec.conv);
    this.post(rec, { type: "state", conversation: rec.conv, state: c ? c.state : "idle" });
  };

  Hub.prototype.openConv = function (c) {
    var hub = this;
    if (c.es) return;
    clearTimeout(c.timer);
    c.timer = null;
    var fresh = c.lastId == null;
    if (fresh) c.told = false; // no resume id: the tabs must reload once this one is up
    var url = "/api/chat/conversations/" + c.id + "/stream/";
    if (!fresh) url += "?lastEventId=" + encodeURIComponent(c.lastId);
    var es = new EventSource(url);
    c.es = es;
    c.settled = false;
    hub.setConvState(c, c.retry ? "reconnecting" : "connecting");

    function mine() {
      return c.es === es;
    }
    function seen(event) {
      if (event.lastEventId) c.lastId = event.lastEventId;
    }

    es.onopen = function () {
      if (!mine()) return;
      c.retry = 0;
      hub.setConvState(c, "live");
      setTimeout(function () {
        if (!mine()) return;
        c.settled = true;
        // A stream that starts live may have missed what happened before it was
        // subscribed: the tabs reload their state once it surely is.
        if (fresh && !c.told) {
          c.told = true;
          hub.broadcast(c.id, { type: "resync", conversation: c.id });
        }
      }, SETTLE_MS);
    };
    es.onerror = function () {
      if (!mine()) return;
      if (es.readyState === EventSource.CLOSED) {
        // Refused (404, 429, 5xx...): EventSource gives up; try again later, resuming.
        es.close();
        c.es = null;
        c.retry += 1;
        hub.setConvState(c, "reconnecting");
        var delay = Math.min(MAX_RETRY_MS, 1000 * Math.pow(2, c.retry - 1));
        c.timer = setTimeout(function () {
          c.timer = null;
          hub.schedule();
        }, delay);
        hub.schedule();
      } else {
        hub.setConvState(c, "reconnecting");
      }
    };
    es.addEventListener("message", function (event) {
      if (!mine()) return;
      seen(event);
      var message = parse(event.data);
      if (!message || message.id == null) return;
      hub.broadcast(c.id, { type: "message", conversation: c.id, message: message });
      if (message.role !== "assistant") return;
      var m = hub.msgs.get(message.id);
      if (message.status !== "streaming") {
        if (m) hub.finish(m, message);
        return;
      }
      m = m || hub.answer(message.id, c.id);
      if (m.final) return;
      if (!m.source) {
        // The creation snapshot: every delta of this answer follows on this stream.
        m.source = "conv";
        m.text = message.content || "";
        m.waitUntil = 0;
        hub.unsync(m);
        hub.emit(m, "");
        hub.schedule();
      }
    });
    es.addEventListener("delta", function (event) {
      if (!mine()) return;
      seen(event);
      var d = parse(event.data);
      if (!d || d.message_id == null) return;
      var m = hub.msgs.get(d.message_id) || hub.answer(d.message_id, c.id);
      if (m.final) return;
      if (m.source === "conv") {
        m.text += d.text || "";
        hub.emit(m, d.text || "");
      } else if (!m.source && m.waitUntil) {
        // The snapshot was missed: only a message stream can give the whole text.
        m.waitUntil = 0;
        hub.schedule();
      } else if (!m.source) {
        hub.schedule();
      }
    });
    es.addEventListener("done", function (event) {
      if (!mine()) return;
      seen(event);
      var message = parse(event.data);
      var m = message && hub.msgs.get(message.id);
      if (m) hub.finish(m, message);
      else if (message) hub.broadcast(c.id, { type: "message", conversation: c.id, message: message });
    });
    es.addEventListener("reset", function (event) {
      if (!mine()) return;
      seen(event);
      // The resume id was no good: answers read from this stream may have holes.
      hub.msgs.forEach(function (m) {
        if (m.conv === c.id && m.source === "conv" && !m.final) {
          m.source = null;
          hub.unsync(m);
        }
      });
      hub.broadcast(c.id, { type: "resync", conversation: c.id });
      hub.schedule();
    });
  };

  Hub.prototype.closeConv = function (c) {
    clearTimeout(c.timer);
    c.timer = null;
    if (c.es) {
      c.es.close();
      c.es = null;
    }
    c.retry = 0;
    this.setConvState(c, "idle");
  };

  /* ------------------------------------------------------ message streams */

  Hub.prototype.openAnswerStream = function (m) {
    var hub = this;
    if (m.es || m.final) return;
    clearTimeout(m.timer);
    m.timer = null;
    if (m.source !== "msg") {
      // Switch sources: read the answer again from its start (or from where this
      // hub's own message stream stopped). Tabs keep showing the longer text.
      m.source = "msg";
      m.text = "";
      m.lastId = null;
      hub.unsync(m);
    }
    var url = "/api/chat/messages/" + m.id + "/stream/";
    if (m.lastId != null) url += "?lastEventId=" + encodeURIComponent(m.lastId);
    var es = new EventSource(url);
    m.es = es;

    function mine() {
      return m.es === es;
    }
    es.onopen = function () {
      if (mine()) m.retry = 0;
    };
    es.addEventListener("delta", function (event) {
      if (!mine()) return;
      if (event.lastEventId) m.lastId = event.lastEventId;
      var d = parse(event.data);
      if (!d) return;
      m.text += d.text || "";
      hub.emit(m, d.text || "");
    });
    es.addEventListener("done", function (event) {
      if (!mine()) return;
      var message = parse(event.data);
      if (message) hub.finish(m, message);
      else hub.closeAnswerStream(m);
    });
    es.addEventListener("reset", function () {
      if (!mine()) return;
      // Our resume id was refused: read the answer again from its start.
      hub.closeAnswerStream(m);
      m.source = null;
      hub.schedule();
    });
    es.onerror = function () {
      if (!mine() || es.readyState !== EventSource.CLOSED) return;
      // 204 after `done`, 404, 429...: look the message up before trying again.
      hub.closeAnswerStream(m);
      m.retry += 1;
      var delay = Math.min(MAX_RETRY_MS, 500 * Math.pow(2, m.retry - 1));
      m.timer = setTimeout(function () {
        m.timer = null;
        hub.lookUp(m);
      }, delay);
    };
  };

  Hub.prototype.closeAnswerStream = function (m) {
    if (m.es) {
      m.es.close();
      m.es = null;
    }
  };

  // After a refused message stream: finished? Then finish it; gone? Tell the tabs.
  Hub.prototype.lookUp = function (m) {
    var hub = this;
    fetch("/api/chat/conversations/" + m.conv + "/", {
      credentials: "same-origin",
      headers: { Accept: "application/json" },
    })
      .then(function (response) {
        if (response.status === 404) return { gone: true };
        if (!response.ok) return null;
        return response.json();
      })
      .then(function (data) {
        if (!data) return hub.schedule();
        var found = data.gone ? null : (data.messages || []).find(function (x) { return x.id === m.id; });
        if (!found) {
          hub.msgs.delete(m.id);
          hub.broadcast(m.conv, { type: "resync", conversation: m.conv });
        } else if (found.status !== "streaming") {
          hub.finish(m, found);
        }
        hub.schedule();
      })
      .catch(function () {
        hub.schedule();
      });
  };

  /* -------------------------------------------------------------- the plan */

  Hub.prototype.schedule = function () {
    var hub = this;
    if (hub.planTimer) return;
    hub.planTimer = setTimeout(function () {
      hub.planTimer = null;
      hub.plan();
    }, 0);
  };

  // Decide which streams to hold, within MAX_STREAMS, and open or close them.
  Hub.prototype.plan = function () {
    var hub = this;
    var now = Date.now();
    var rank = new Map(); // conversation id -> latest activity of a tab looking at it
    var nextCheck = Infinity;
    hub.ports.forEach(function (rec) {
      if (rec.conv == null) return;
      if (rec.hidden) {
        var until = rec.hiddenAt + HIDDEN_GRACE_MS;
        if (until <= now) return;
        nextCheck = Math.min(nextCheck, until);
      }
      rank.set(rec.conv, Math.max(rank.get(rec.conv) || 0, rec.activeAt));
    });

    var focus = null;
    rank.forEach(function (at, id) {
      if (focus == null || at > rank.get(focus)) focus = id;
    });

    hub.convs.forEach(function (c) {
      if (c.id !== focus && (c.es || c.timer)) hub.closeConv(c);
      if (c.id !== focus && !hub.viewers(c.id).length && !c.es) hub.convs.delete(c.id);
    });
    var used = 0;
    if (focus != null) {
      var fc = hub.conv(focus);
      if (!fc.es && !fc.timer) hub.openConv(fc);
      used = 1;
    }

    function covered(m) {
      var c = hub.convs.get(m.conv);
      return m.source === "conv" && c && (c.es || c.timer);
    }
    var wanted = [];
    hub.msgs.forEach(function (m) {
      if (m.final) return;
      if (!rank.has(m.conv)) {
        if (!hub.viewers(m.conv).length && !m.es) {
          // Nobody looks at it any more: forget it (a conversation-sourced text
          // would be stale once that stream is closed).
          if (!covered(m)) hub.msgs.delete(m.id);
        }
        return;
      }
      if (covered(m)) return;
      if (m.timer) return;
      if (m.waitUntil > now) {
        nextCheck = Math.min(nextCheck, m.waitUntil);
        return;
      }
      wanted.push(m);
    });
    wanted.sort(function (a, b) {
      return rank.get(b.conv) - rank.get(a.conv) || a.id - b.id;
    });
    var budget = Math.max(0, MAX_STREAMS - used);
    var keep = new Set(wanted.slice(0, budget));
    hub.msgs.forEach(function (m) {
      if (m.es && !keep.has(m)) hub.closeAnswerStream(m);
    });
    keep.forEach(function (m) {
      hub.openAnswerStream(m);
    });

    if (nextCheck !== Infinity) {
      setTimeout(function () {
        hub.schedule();
      }, Math.max(10, nextCheck - now + 5));
    }
  };

  function parse(data) {
    try {
      return JSON.parse(data);
    } catch (e) {
      return null;
    }
  }

  scope.ssechatChatHub = {
    Hub: Hub,
    MAX_STREAMS: MAX_STREAMS,
  };

  // In a SharedWorker: one hub for every tab that connects.
  if (typeof scope.SharedWorkerGlobalScope === "function" && scope instanceof scope.SharedWorkerGlobalScope) {
    var shared = new Hub();
    scope.ssechatChatHub.hub = shared;
    scope.onconnect = function (event) {
      shared.connect(event.ports[0]);
    };
    // A worker's errors reach no console a page shows: hand them to the tabs.
    var report = function (text) {
      shared.ports.forEach(function (rec) {
        shared.post(rec, { type: "hub-error", message: String(text) });
      });
    };
    scope.addEventListener("error", function (event) {
      report(event.message || event);
    });
    scope.addEventListener("unhandledrejection", function (event) {
      report(event.reason && event.reason.message ? event.reason.message : event.reason);
    });
  }
})(self);
