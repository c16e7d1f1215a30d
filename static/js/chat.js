/* The chat page: conversations, messages, streamed answers.
 *
 * Everything is loaded over the JSON API (/api/chat/...) with
 * ssechat.fetchJSON; live updates come from the connection hub
 * (static/js/chat-worker.js), a SharedWorker that holds the event streams for
 * all tabs of this browser (see that file for why and how).
 *
 * Text from users and models only ever reaches the page as Text nodes: user
 * messages through textContent, answers through ssechat.markdown (which
 * builds DOM nodes and never parses HTML).
 *
 * A streaming answer shows the longer of two texts that are both prefixes of
 * the final answer: the content loaded over the API (a placeholder) and the
 * exact text from the hub (all deltas from the start). When the answer ends,
 * its final Message replaces both.
 */
(function () {
  "use strict";

  var ns = window.ssechat;
  var root = document.getElementById("chat-app");
  if (!root || !ns || !ns.fetchJSON || !ns.markdown) return;

  var $ = function (id) {
    return document.getElementById(id);
  };
  var els = {
    shell: root,
    list: $("conversation-list"),
    listEmpty: $("conversation-empty"),
    newChat: $("new-chat"),
    headerNewChat: $("header-new-chat"),
    toggle: $("sidebar-toggle"),
    scrim: $("sidebar-scrim"),
    title: $("chat-title"),
    conn: $("conn-state"),
    scroller: $("scroller"),
    empty: $("empty-state"),
    notice: $("thread-notice"),
    thread: $("thread"),
    jump: $("jump-bottom"),
    form: $("composer"),
    input: $("prompt"),
    send: $("send"),
    stop: $("stop"),
    dialog: $("delete-dialog"),
    dialogName: $("delete-name"),
    dialogConfirm: $("delete-confirm"),
    toasts: $("toasts"),
  };

  var FINAL = { complete: true, cancelled: true, failed: true };
  var PROTOCOL = 1; // of the page <-> hub messages (static/js/chat-worker.js)
  var TEXT_QUIET_MS = 15000; // a streaming answer silent this long: reload it over the API

  var api = {
    list: function () {
      return ns.fetchJSON("/api/chat/conversations/");
    },
    create: function () {
      // No title: the server names the conversation after its first message.
      return ns.fetchJSON("/api/chat/conversations/", { method: "POST", body: {} });
    },
    get: function (id) {
      return ns.fetchJSON("/api/chat/conversations/" + id + "/");
    },
    rename: function (id, title) {
      return ns.fetchJSON("/api/chat/conversations/" + id + "/", { method: "PATCH", body: { title: title } });
    },
    remove: function (id) {
      return ns.fetchJSON("/api/chat/conversations/" + id + "/", { method: "DELETE" });
    },
    send: function (id, content) {
      return ns.fetchJSON("/api/chat/conversations/" + id + "/messages/", { method: "POST", body: { content: content } });
    },
    cancel: function (id) {
      return ns.fetchJSON("/api/chat/messages/" + id + "/cancel/", { method: "POST", body: {} });
    },
    regenerate: function (id) {
      return ns.fetchJSON("/api/chat/messages/" + id + "/regenerate/", { method: "POST", body: {} });
    },
  };

  var state = {
    conversations: [],
    convId: null,
    title: "",
    messages: new Map(), // id -> {data: Message JSON, live: exact text or null, touched: ms}
    pending: new Map(), // id -> hub text that came before its message
    selected: new Map(), // user message id -> assistant message id shown (answer versions)
    views: new Map(), // id -> rendered view {el, ...}
    holds: 0, // > 0: hub events wait in `queue` (while loading or sending)
    queue: [],
    loadToken: 0,
    sending: false,
    stopping: false,
    notFound: false,
    streamingKey: "",
    stick: true,
    connState: "idle",
  };

  /* ------------------------------------------------------------ helpers */

  function el(tag, className, textValue) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    if (textValue != null) node.textContent = textValue;
    return node;
  }

  var ICONS = {
    spark: "M12 3l1.9 5.1L19 10l-5.1 1.9L12 17l-1.9-5.1L5 10l5.1-1.9z M19 15l.8 2.2L22 18l-2.2.8L19 21l-.8-2.2L16 18l2.2-.8z",
    copy: "M9 9h10v10H9z M5 15V5h10",
    check: "M5 12.5l4.5 4.5L19 7",
    refresh: "M20 11a8 8 0 1 0-2.3 5.7 M20 4v7h-7",
    pencil: "M4 20h4L19 9l-4-4L4 16z M13.5 6.5l4 4",
    trash: "M4 7h16 M9 7V4h6v3 M6 7l1 13h10l1-13",
    alert: "M12 8v5 M12 16.5v.01 M10.3 3.9 2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z",
    left: "M15 6l-6 6 6 6",
    right: "M9 6l6 6-6 6",
  };

  function icon(name) {
    var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("fill", "none");
    svg.setAttribute("stroke", "currentColor");
    svg.setAttribute("stroke-width", "2");
    svg.setAttribute("stroke-linecap", "round");
    svg.setAttribute("stroke-linejoin", "round");
    svg.setAttribute("aria-hidden", "true");
    var path = document.createElementNS("http://www.w3.org/2000/svg", "path");
    path.setAttribute("d", ICONS[name]);
    svg.appendChild(path);
    return svg;
  }

  function iconButton(name, label, className) {
    var b = el("button", "btn btn-ghost btn-icon btn-sm " + (className || ""));
    b.type = "button";
    b.title = label;
    b.setAttribute("aria-label", label);
    b.appendChild(icon(name));
    return b;
  }

  function toast(message, kind) {
    var t = el("div", "toast" + (kind ? " toast-" + kind : ""), message);
    t.setAttribute("role", kind === "error" ? "alert" : "status");
    els.toasts.appendChild(t);
    setTimeout(function () {
      t.classList.add("toast-out");
      setTimeout(function () {
        t.remove();
      }, 300);
    }, 4500);
  }

  function isFinal(message) {
    return !!FINAL[message.status];
  }

  function titleFrom(text) {
    var line = text.replace(/\s+/g, " ").trim();
    return line.length > 60 ? line.slice(0, 57).replace(/\s+\S*$/, "") + "…" : line;
  }

  function convUrl(id) {
    return id == null ? "/chat/" : "/chat/" + id + "/";
  }

  function displayText(rec) {
    var content = rec.data.content || "";
    if (rec.data.status !== "streaming" || rec.live == null) return content;
    return rec.live.length >= content.length ? rec.live : content;
  }

  function orderedMessages() {
    var list = Array.from(state.messages.values()).map(function (r) {
      return r.data;
    });
    // Oldest first, as the API lists them; a message being sent goes last.
    list.sort(function (a, b) {
      return (a._temp ? Infinity : a.id) - (b._temp ? Infinity : b.id) || 0;
    });
    return list;
  }

  function streamingAnswer() {
    var found = null;
    state.messages.forEach(function (r) {
      if (r.data.role === "assistant" && r.data.status === "streaming" && (!found || r.data.id > found.id)) found = r.data;
    });
    return found;
  }

  /* ---------------------------------------------------- the hub (streams) */

  var hub = (function () {
    var port = null;
    var tabId = "t" + Date.now().toString(36) + Math.random().toString(36).slice(2, 10);
    var ready = null;

    function post(data) {
      if (!port) return;
      try {
        port.postMessage(data);
      } catch (e) {
        /* the worker is gone; nothing to do */
      }
    }

    function holdLock() {
      // The hub learns that this tab is gone when it can take this lock.
      if (!navigator.locks || !navigator.locks.request) return Promise.resolve();
      return new Promise(function (granted) {
        navigator.locks
          .request("ssechat-chat-tab:" + tabId, function () {
            granted();
            return new Promise(function () {});
          })
          .catch(granted);
      });
    }

    function loadPageHub() {
      return new Promise(function (resolve, reject) {
        var script = document.createElement("script");
        script.src = root.getAttribute("data-worker");
        script.onload = resolve;
        script.onerror = reject;
        document.head.appendChild(script);
      }).then(function () {
        var local = new window.ssechatChatHub.Hub({ pageMode: true });
        var channel = new MessageChannel();
        local.connect(channel.port1);
        return channel.port2;
      });
    }

    function start() {
      var make;
      if (typeof window.SharedWorker === "function") {
        make = Promise.resolve().then(function () {
          // The name carries the protocol version: a page never talks to an older hub.
          var worker = new SharedWorker(root.getAttribute("data-worker"), { name: "ssechat-chat/" + PROTOCOL });
          worker.onerror = function () {};
          return worker.port;
        });
      } else {
        make = Promise.reject(new Error("no SharedWorker"));
      }
      ready = make
        .catch(loadPageHub)
        .then(function (p) {
          port = p;
          port.onmessage = function (event) {
            onHub(event.data || {});
          };
          port.start();
          return holdLock();
        })
        .then(function () {
          post({ type: "hello", tab: tabId, hidden: document.hidden });
        });
      return ready;
    }

    return {
      start: start,
      post: function (data) {
        if (ready) ready.then(function () {
          post(data);
        });
      },
      tab: tabId,
    };
  })();

  function onHub(msg) {
    if (msg.type === "hub-error") {
      console.error("ssechat chat hub: " + msg.message);
      return;
    }
    if (msg.conversation == null || Number(msg.conversation) !== state.convId) return;
    if (state.holds > 0) {
      state.queue.push(msg);
      return;
    }
    applyHub(msg);
  }

  function applyHub(msg) {
    var r;
    switch (msg.type) {
      case "message":
        upsert(msg.message);
        afterChange();
        break;
      case "text":
        r = state.messages.get(msg.id);
        if (!r) {
          state.pending.set(msg.id, msg.text);
          break;
        }
        if (r.data.status !== "streaming") break;
        r.data.content = displayText(r); // keep showing the longer text
        r.live = msg.text;
        touched(r);
        scheduleText(msg.id);
        break;
      case "delta":
        r = state.messages.get(msg.id);
        if (!r) {
          if (state.pending.has(msg.id)) state.pending.set(msg.id, state.pending.get(msg.id) + msg.text);
          break;
        }
        if (r.data.status !== "streaming" || r.live == null) break;
        r.live += msg.text;
        touched(r);
        scheduleText(msg.id);
        break;
      case "state":
        setConnState(msg.state);
        break;
      case "resync":
        resync();
        break;
    }
  }

  // Hold hub events back (while the page loads or posts); release(token) lets
  // them through, unless another conversation was opened in between.
  function hold() {
    state.holds += 1;
    return state.loadToken;
  }

  function release(token) {
    if (token !== state.loadToken) return;
    state.holds = Math.max(0, state.holds - 1);
    if (state.holds > 0) return;
    var queued = state.queue;
    state.queue = [];
    queued.forEach(function (msg) {
      if (Number(msg.conversation) === state.convId) applyHub(msg);
    });
  }

  function touched(r) {
    r.touched = Date.now();
  }

  // Tell the hub which answers this tab shows as streaming.
  function reportStreaming() {
    var ids = [];
    state.messages.forEach(function (r) {
      if (r.data.role === "assistant" && r.data.status === "streaming" && typeof r.data.id === "number") ids.push(r.data.id);
    });
    ids.sort(function (a, b) {
      return a - b;
    });
    var key = state.convId + ":" + ids.join(",");
    if (key === state.streamingKey) return;
    state.streamingKey = key;
    if (state.convId != null && ids.length) hub.post({ type: "streaming", conversation: state.convId, ids: ids });
  }

  var connTimer = null;
  function setConnState(value) {
    state.connState = value;
    clearTimeout(connTimer);
    var show = function (text, cls) {
      els.conn.textContent = text;
      els.conn.className = "pill conn-pill " + cls;
      els.conn.hidden = false;
    };
    if (!navigator.onLine) return show("Offline", "conn-closed");
    if (value === "reconnecting") {
      // Say so only when it lasts: a reconnect usually takes a moment.
      connTimer = setTimeout(function () {
        show("Reconnecting…", "conn-reconnecting");
        checkGone();
      }, 1500);
    } else {
      els.conn.hidden = true;
    }
  }

  /* ------------------------------------------------------ message state */

  function upsert(message) {
    if (!message || message.id == null) return;
    var r = state.messages.get(message.id);
    if (!r) {
      r = { data: Object.assign({}, message), live: null, touched: Date.now() };
      if (state.pending.has(message.id)) {
        if (message.status === "streaming") r.live = state.pending.get(message.id);
        state.pending.delete(message.id);
      }
      state.messages.set(message.id, r);
      // A new answer to a message: show it (the newest version).
      if (message.role === "assistant") state.selected.delete(groupKeyOf(message.id));
      return;
    }
    if (isFinal(r.data)) {
      if (isFinal(message)) r.data = Object.assign({}, message);
      return; // a final message never goes back to streaming
    }
    if (isFinal(message)) {
      r.data = Object.assign({}, message);
      r.live = null;
      return;
    }
    var shown = displayText(r);
    r.data = Object.assign({}, message);
    if (shown.length > (message.content || "").length) r.data.content = shown;
  }

  function groupKeyOf(id) {
    var list = orderedMessages();
    var key = null;
    for (var k = 0; k < list.length; k++) {
      if (list[k].role === "user") key = list[k].id;
      if (list[k].id === id) return key;
    }
    return key;
  }

  // Turn the message list into what is shown: user messages and, per user
  // message, one of its answers (the newest unless the user picked another).
  function buildItems() {
    var list = orderedMessages();
    var items = [];
    var group = null;
    list.forEach(function (m) {
      if (m.role === "user") {
        group = null;
        items.push({ message: m });
        return;
      }
      if (!group) {
        group = { key: items.length && items[items.length - 1].message.role === "user" ? items[items.length - 1].message.id : "a" + m.id, versions: [] };
        items.push({ group: group });
      }
      group.versions.push(m);
    });
    items.forEach(function (item) {
      if (!item.group) return;
      var g = item.group;
      var chosen = state.selected.get(g.key);
      var index = g.versions.findIndex(function (m) {
        return m.id === chosen;
      });
      if (index === -1) index = g.versions.length - 1;
      item.message = g.versions[index];
      item.version = index + 1;
      item.versions = g.versions.length;
    });
    return items;
  }

  /* ------------------------------------------------------------ rendering */

  function afterChange() {
    renderThread();
    reportStreaming();
    updateComposer();
    noticeFinished();
  }

  // Answers that finish change titles and the order of the list: reload it.
  var finishedBefore = new Set();
  function noticeFinished() {
    state.messages.forEach(function (r, id) {
      if (r.data.role !== "assistant" || !isFinal(r.data) || finishedBefore.has(id)) return;
      finishedBefore.add(id);
      if (Date.now() - (Date.parse(r.data.completed_at) || 0) < 60000) refreshList(300);
    });
  }

  function renderThread() {
    var items = buildItems();
    var last = items.length ? items[items.length - 1] : null;
    var seen = new Set();
    var prev = null;
    items.forEach(function (item) {
      var m = item.message;
      var view = state.views.get(m.id);
      if (!view) {
        view = m.role === "user" ? userView(m) : answerView(m);
        state.views.set(m.id, view);
      }
      seen.add(m.id);
      if (m.role === "assistant") updateAnswer(view, m, item, item === last);
      else updateUser(view, m);
      var next = prev ? prev.nextSibling : els.thread.firstChild;
      if (next !== view.el) els.thread.insertBefore(view.el, next);
      prev = view.el;
    });
    state.views.forEach(function (view, id) {
      if (!seen.has(id)) {
        view.el.remove();
        if (!state.messages.has(id)) state.views.delete(id);
      }
    });
    var empty = !items.length && !state.notFound;
    els.empty.hidden = !empty || root.classList.contains("is-loading");
    els.thread.hidden = empty;
    root.classList.toggle("has-messages", !!items.length);
    followBottom();
  }

  function userView(m) {
    var article = el("article", "msg msg-user");
    article.setAttribute("data-id", String(m.id));
    article.setAttribute("data-role", "user");
    var body = el("div", "msg-body");
    body.textContent = m.content;
    article.appendChild(body);
    return { el: article, body: body, text: m.content };
  }

  function updateUser(view, m) {
    view.el.setAttribute("data-id", String(m.id));
    view.el.classList.toggle("msg-pending", !!m._temp);
    if (view.text !== m.content) {
      view.body.textContent = m.content;
      view.text = m.content;
    }
  }

  function answerView(m) {
    var article = el("article", "msg msg-assistant");
    article.setAttribute("data-id", String(m.id));
    article.setAttribute("data-role", "assistant");
    var avatar = el("div", "msg-avatar");
    avatar.appendChild(icon("spark"));
    var body = el("div", "msg-body");
    var md = el("div", "markdown");
    var typing = el("div", "typing");
    typing.setAttribute("aria-label", "Writing");
    typing.appendChild(el("span"));
    typing.appendChild(el("span"));
    typing.appendChild(el("span"));
    var error = el("div", "msg-error-text");
    error.setAttribute("role", "alert");
    error.appendChild(icon("alert"));
    var errorText = el("div", "msg-error-body");
    var errorTitle = el("strong", null, "The answer failed.");
    var errorDetail = el("span", "msg-error-detail");
    errorText.appendChild(errorTitle);
    errorText.appendChild(errorDetail);
    error.appendChild(errorText);
    var retry = el("button", "btn btn-secondary btn-sm retry-btn");
    retry.type = "button";
    retry.appendChild(icon("refresh"));
    retry.appendChild(document.createTextNode("Retry"));
    error.appendChild(retry);

    var actions = el("div", "msg-actions");
    var pager = el("div", "msg-pager");
    var prevBtn = iconButton("left", "Previous answer", "pager-prev");
    var pagerLabel = el("span", "pager-label");
    var nextBtn = iconButton("right", "Next answer", "pager-next");
    pager.appendChild(prevBtn);
    pager.appendChild(pagerLabel);
    pager.appendChild(nextBtn);
    var copy = iconButton("copy", "Copy", "copy-btn");
    var regen = iconButton("refresh", "Regenerate", "regenerate-btn");
    var stopped = el("span", "msg-note", "Stopped");
    actions.appendChild(pager);
    actions.appendChild(copy);
    actions.appendChild(regen);
    actions.appendChild(stopped);

    body.appendChild(md);
    body.appendChild(typing);
    body.appendChild(error);
    body.appendChild(actions);
    article.appendChild(avatar);
    article.appendChild(body);

    var view = {
      el: article,
      md: md,
      typing: typing,
      error: error,
      errorDetail: errorDetail,
      retry: retry,
      actions: actions,
      pager: pager,
      pagerLabel: pagerLabel,
      prev: prevBtn,
      next: nextBtn,
      copy: copy,
      regen: regen,
      stopped: stopped,
      rendered: null,
      id: m.id,
    };
    copy.addEventListener("click", function () {
      var r = state.messages.get(view.id);
      if (r) copyText(displayText(r), copy);
    });
    regen.addEventListener("click", function () {
      regenerate(view.id);
    });
    retry.addEventListener("click", function () {
      regenerate(view.id);
    });
    prevBtn.addEventListener("click", function () {
      switchVersion(view, -1);
    });
    nextBtn.addEventListener("click", function () {
      switchVersion(view, 1);
    });
    return view;
  }

  function updateAnswer(view, m, item, isLast) {
    var streaming = m.status === "streaming";
    view.group = item;
    view.el.classList.toggle("msg-streaming", streaming);
    view.el.classList.toggle("msg-error", m.status === "failed");
    view.el.classList.toggle("msg-cancelled", m.status === "cancelled");
    view.el.setAttribute("data-status", m.status);
    view.el.setAttribute("aria-busy", streaming ? "true" : "false");
    renderText(view);

    view.error.hidden = m.status !== "failed";
    view.errorDetail.textContent = m.error || "Something went wrong while writing this answer.";
    var busy = !!streamingAnswer() || state.sending;
    view.retry.hidden = !isLast;
    view.retry.disabled = busy;

    view.actions.hidden = streaming;
    view.el.classList.toggle("msg-last", isLast);
    view.regen.hidden = !isLast || m.status === "failed";
    view.regen.disabled = busy;
    view.copy.hidden = !(m.content || "").length;
    view.stopped.hidden = m.status !== "cancelled";
    view.pager.hidden = item.versions < 2;
    view.pagerLabel.textContent = item.version + " / " + item.versions;
    view.prev.disabled = item.version <= 1;
    view.next.disabled = item.version >= item.versions;
  }

  function renderText(view) {
    var r = state.messages.get(view.id);
    if (!r) return;
    var value = displayText(r);
    var streaming = r.data.status === "streaming";
    view.typing.hidden = !(streaming && !value);
    if (view.rendered === value) return;
    view.rendered = value;
    ns.markdown.renderInto(view.md, value);
  }

  // Streaming text is rendered at most once an animation frame, and less often
  // when rendering gets slow (a very long answer): never more than a quarter of the time.
  var textFrame = 0;
  var textTimer = 0;
  var nextRenderAt = 0;
  var dirty = new Set();
  function scheduleText(id) {
    dirty.add(id);
    if (textFrame || textTimer) return;
    var wait = nextRenderAt - performance.now();
    if (wait > 16) {
      textTimer = setTimeout(function () {
        textTimer = 0;
        textFrame = requestAnimationFrame(flushText);
      }, wait);
    } else {
      textFrame = requestAnimationFrame(flushText);
    }
    // Hidden tabs get no animation frames; do not let the text wait for ever.
    if (document.hidden) setTimeout(flushText, Math.max(250, wait));
  }

  function flushText() {
    cancelAnimationFrame(textFrame);
    clearTimeout(textTimer);
    textFrame = 0;
    textTimer = 0;
    if (!dirty.size) return;
    var started = performance.now();
    dirty.forEach(function (id) {
      var view = state.views.get(id);
      if (view && view.md) renderText(view);
    });
    dirty.clear();
    followBottom();
    var now = performance.now();
    nextRenderAt = now + 3 * (now - started);
  }

  function switchVersion(view, step) {
    var item = view.group;
    if (!item || !item.group) return;
    var versions = item.group.versions;
    var index = item.version - 1 + step;
    if (index < 0 || index >= versions.length) return;
    state.selected.set(item.group.key, versions[index].id);
    renderThread();
  }

  function copyText(value, button) {
    var done = function () {
      button.classList.add("copied");
      var old = button.title;
      button.title = "Copied";
      setTimeout(function () {
        button.classList.remove("copied");
        button.title = old;
      }, 1500);
    };
    if (navigator.clipboard && navigator.clipboard.writeText) {
      navigator.clipboard.writeText(value).then(done, function () {
        toast("Could not copy to the clipboard.", "error");
      });
    } else {
      toast("Copying needs a secure (https) page.", "error");
    }
  }

  /* --------------------------------------------------------------- scroll */

  function nearBottom() {
    var s = els.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function followBottom() {
    if (state.stick) els.scroller.scrollTop = els.scroller.scrollHeight;
    els.jump.hidden = state.stick || nearBottom();
  }

  function scrollToBottom() {
    state.stick = true;
    els.scroller.scrollTop = els.scroller.scrollHeight;
    els.jump.hidden = true;
  }

  /* ----------------------------------------------------------- composer */

  function updateComposer() {
    var busy = streamingAnswer();
    var hasText = els.input.value.trim().length > 0;
    els.stop.hidden = !busy;
    els.send.hidden = !!busy;
    els.send.disabled = !hasText || state.sending || !!busy || state.notFound;
    els.stop.disabled = state.stopping;
    root.classList.toggle("is-streaming", !!busy);
  }

  function autosize() {
    els.input.style.height = "auto";
    els.input.style.height = Math.min(els.input.scrollHeight, 240) + "px";
  }

  function submit() {
    var text = els.input.value;
    if (!text.trim() || state.sending || streamingAnswer() || state.notFound) return;
    send(text);
  }

  var tempSeq = 0;
  async function send(text) {
    state.sending = true;
    els.input.value = "";
    autosize();
    var temp = {
      id: "temp-" + ++tempSeq,
      _temp: true,
      role: "user",
      content: text.trim(),
      status: "complete",
      created_at: new Date().toISOString(),
    };
    state.messages.set(temp.id, { data: temp, live: null, touched: Date.now() });
    state.stick = true;
    afterChange();
    var token = hold();
    var convId = state.convId;
    try {
      if (convId == null) {
        var conv = await api.create();
        conv.title = conv.title || titleFrom(text);
        if (token !== state.loadToken) return;
        convId = conv.id;
        state.conversations.unshift(conv);
        state.convId = conv.id;
        state.title = conv.title;
        history.pushState({ conversation: conv.id }, "", convUrl(conv.id));
        hub.post({ type: "view", conversation: conv.id });
        renderTitle();
        renderList();
      }
      var result = await api.send(convId, text.trim());
      if (token !== state.loadToken || convId !== state.convId) return;
      state.messages.delete(temp.id);
      upsert(result.user_message);
      upsert(result.assistant_message);
      touchConversation(convId);
      refreshList(200);
    } catch (err) {
      state.messages.delete(temp.id);
      if (!els.input.value) {
        els.input.value = text;
        autosize();
      }
      if (err.status === 404 && convId === state.convId) showNotice(err);
      else toast(err.message || "The message could not be sent.", "error");
    } finally {
      state.sending = false;
      release(token);
      afterChange();
    }
  }

  async function stop() {
    var answer = streamingAnswer();
    if (!answer || state.stopping) return;
    state.stopping = true;
    updateComposer();
    try {
      var message = await api.cancel(answer.id);
      if (message && Number(message.conversation_id) === state.convId) {
        upsert(message);
        afterChange();
      }
    } catch (err) {
      toast(err.message || "Could not stop the answer.", "error");
    } finally {
      state.stopping = false;
      updateComposer();
    }
  }

  async function regenerate(id) {
    if (streamingAnswer() || state.sending) return;
    var convId = state.convId;
    state.sending = true;
    state.stick = true;
    afterChange();
    var token = hold();
    try {
      var result = await api.regenerate(id);
      if (convId !== state.convId) return;
      upsert(result.assistant_message);
      touchConversation(convId);
    } catch (err) {
      toast(err.message || "Could not regenerate the answer.", "error");
    } finally {
      state.sending = false;
      release(token);
      afterChange();
    }
  }

  /* --------------------------------------------------------- conversations */

  function touchConversation(id) {
    var conv = state.conversations.find(function (c) {
      return c.id === id;
    });
    if (conv) {
      conv.updated_at = new Date().toISOString();
      renderList();
    }
  }

  var listTimer = null;
  function refreshList(delay) {
    clearTimeout(listTimer);
    listTimer = setTimeout(function () {
      api.list().then(
        function (data) {
          state.conversations = (data && data.results) || [];
          var current = state.conversations.find(function (c) {
            return c.id === state.convId;
          });
          if (current && current.title !== state.title) {
            state.title = current.title;
            renderTitle();
          }
          renderList();
        },
        function () {}
      );
    }, delay || 0);
  }

  function dayBucket(iso) {
    var t = Date.parse(iso);
    if (!t) return "Older";
    var now = new Date();
    var startToday = new Date(now.getFullYear(), now.getMonth(), now.getDate()).getTime();
    if (t >= startToday) return "Today";
    if (t >= startToday - 86400000) return "Yesterday";
    if (t >= startToday - 7 * 86400000) return "Previous 7 days";
    if (t >= startToday - 30 * 86400000) return "Previous 30 days";
    return "Older";
  }

  var renaming = null;
  var rendering = false;
  function renderList() {
    var list = state.conversations.slice().sort(function (a, b) {
      return (Date.parse(b.updated_at) || 0) - (Date.parse(a.updated_at) || 0) || b.id - a.id;
    });
    // A list update (another tab, an answer's end) may come while a title is being
    // edited: the new input keeps what was typed so far, and its caret.
    var typing = renaming ? els.list.querySelector(".rename-input") : null;
    if (typing && typing.dataset.id !== String(renaming)) typing = null; // another title
    var frag = document.createDocumentFragment();
    var bucket = null;
    list.forEach(function (c) {
      var b = dayBucket(c.updated_at);
      if (b !== bucket) {
        bucket = b;
        var head = el("li", "sidebar-group", b);
        head.setAttribute("role", "presentation");
        frag.appendChild(head);
      }
      frag.appendChild(listItem(c));
    });
    rendering = true; // the old input's blur on removal is not the end of an edit
    try {
      els.list.replaceChildren(frag);
    } finally {
      rendering = false;
    }
    els.listEmpty.hidden = list.length > 0;
    if (renaming) {
      var input = els.list.querySelector(".rename-input");
      if (input) {
        if (typing) {
          input.value = typing.value;
          input.dataset.kept = "1";
          input.setSelectionRange(typing.selectionStart, typing.selectionEnd);
        }
        input.focus();
      }
    }
  }

  function listItem(c) {
    var li = el("li", "conv");
    li.setAttribute("data-id", String(c.id));
    var title = c.title || "New chat";
    if (renaming === c.id) {
      var form = el("form", "sidebar-item rename-form");
      var input = el("input", "rename-input");
      input.dataset.id = String(c.id);
      input.type = "text";
      input.value = title;
      input.maxLength = 200;
      input.setAttribute("aria-label", "Conversation title");
      form.appendChild(input);
      form.addEventListener("submit", function (e) {
        e.preventDefault();
        finishRename(c, input.value);
      });
      input.addEventListener("keydown", function (e) {
        if (e.key === "Escape") {
          e.preventDefault();
          renaming = null;
          renderList();
        }
      });
      input.addEventListener("blur", function () {
        if (renaming === c.id && !rendering) finishRename(c, input.value);
      });
      setTimeout(function () {
        if (!input.dataset.kept) input.select();
      }, 0);
      li.appendChild(form);
      return li;
    }
    var a = el("a", "sidebar-item");
    a.href = convUrl(c.id);
    if (c.id === state.convId) {
      a.setAttribute("aria-current", "page");
      a.classList.add("active");
    }
    a.appendChild(el("span", "title", title));
    a.title = title;
    var actions = el("div", "conv-actions");
    var rename = iconButton("pencil", "Rename", "rename-btn");
    var del = iconButton("trash", "Delete", "delete-btn");
    rename.setAttribute("aria-label", "Rename “" + title + "”");
    del.setAttribute("aria-label", "Delete “" + title + "”");
    actions.appendChild(rename);
    actions.appendChild(del);
    a.addEventListener("click", function (e) {
      if (e.metaKey || e.ctrlKey || e.shiftKey || e.altKey || e.button !== 0) return;
      e.preventDefault();
      closeSidebar();
      if (c.id !== state.convId) openConversation(c.id, true);
    });
    rename.addEventListener("click", function (e) {
      e.preventDefault();
      e.stopPropagation();
      renaming = c.id;
      renderList();
    });
    del.addEventListener("click", function (e) {
      e.preventDefault();
      e.stopPropagation();
      askDelete(c);
    });
    li.appendChild(a);
    li.appendChild(actions);
    return li;
  }

  function conversationById(id, fallback) {
    return (
      state.conversations.find(function (x) {
        return x.id === id;
      }) || fallback
    );
  }

  async function finishRename(c, value) {
    renaming = null;
    // The list may have been reloaded since the edit began: change the entry it has now.
    c = conversationById(c.id, c);
    var title = value.replace(/\s+/g, " ").trim();
    if (!title || title === c.title) {
      renderList();
      return;
    }
    var old = c.title;
    c.title = title;
    renderList();
    if (c.id === state.convId) {
      state.title = title;
      renderTitle();
    }
    try {
      var updated = await api.rename(c.id, title);
      c = conversationById(c.id, c);
      Object.assign(c, updated);
    } catch (err) {
      c = conversationById(c.id, c);
      c.title = old;
      toast(err.message || "Could not rename the conversation.", "error");
    }
    if (c.id === state.convId) {
      state.title = c.title;
      renderTitle();
    }
    renderList();
  }

  var deleting = null;
  function askDelete(c) {
    deleting = c;
    els.dialogName.textContent = c.title || "New chat";
    if (els.dialog.showModal) els.dialog.showModal();
    else if (window.confirm("Delete this chat?")) confirmDelete();
  }

  async function confirmDelete() {
    var c = deleting;
    deleting = null;
    if (els.dialog.open) els.dialog.close();
    if (!c) return;
    try {
      await api.remove(c.id);
    } catch (err) {
      if (err.status !== 404) {
        toast(err.message || "Could not delete the conversation.", "error");
        return;
      }
    }
    state.conversations = state.conversations.filter(function (x) {
      return x.id !== c.id;
    });
    renderList();
    if (c.id === state.convId) openConversation(null, true);
    toast("Chat deleted.");
  }

  function renderTitle() {
    var title = state.convId == null ? "New chat" : state.title || "New chat";
    els.title.textContent = title;
    document.title = title + " · ssechat";
  }

  /* ------------------------------------------------ opening a conversation */

  function resetThread() {
    state.messages = new Map();
    state.pending = new Map();
    state.selected = new Map();
    state.views.forEach(function (view) {
      view.el.remove();
    });
    state.views = new Map();
    state.queue = [];
    state.streamingKey = "";
    state.notFound = false;
    els.notice.hidden = true;
    els.notice.replaceChildren();
  }

  async function openConversation(id, push) {
    var token = ++state.loadToken;
    state.holds = 0;
    resetThread();
    state.convId = id;
    state.stick = true;
    state.title = "";
    var known = state.conversations.find(function (c) {
      return c.id === id;
    });
    if (known) state.title = known.title;
    if (push) history.pushState({ conversation: id }, "", convUrl(id));
    renderTitle();
    renderList();
    setConnState("idle");
    hub.post({ type: "view", conversation: id });
    if (id == null) {
      root.classList.remove("is-loading");
      afterChange();
      els.input.focus();
      return;
    }
    hold();
    root.classList.add("is-loading");
    renderThread();
    try {
      var data = await api.get(id);
      if (token !== state.loadToken) return;
      state.title = data.title;
      renderTitle();
      (data.messages || []).forEach(upsert);
    } catch (err) {
      if (token !== state.loadToken) return;
      showNotice(err);
    } finally {
      if (token === state.loadToken) {
        root.classList.remove("is-loading");
        release(token);
        afterChange();
        scrollToBottom();
      }
    }
  }

  function showNotice(err) {
    var box = el("div", "thread-notice-box");
    if (err.status === 404) {
      state.notFound = true;
      box.appendChild(el("strong", null, "This conversation does not exist any more."));
      box.appendChild(el("span", null, "It may have been deleted in another tab."));
    } else {
      box.appendChild(el("strong", null, "The conversation could not be loaded."));
      box.appendChild(el("span", null, err.message || "Please try again."));
    }
    var action = el("button", "btn btn-secondary btn-sm", err.status === 404 ? "Start a new chat" : "Try again");
    action.type = "button";
    action.addEventListener("click", function () {
      openConversation(err.status === 404 ? null : state.convId, err.status === 404);
    });
    box.appendChild(action);
    els.notice.replaceChildren(box);
    els.notice.hidden = false;
    updateComposer();
  }

  // Reload the open conversation over the API and merge it in.
  var resyncing = null;
  function resync() {
    if (state.convId == null || resyncing) return resyncing;
    var id = state.convId;
    var token = hold();
    resyncing = api
      .get(id)
      .then(
        function (data) {
          if (token !== state.loadToken) return;
          var ids = new Set();
          (data.messages || []).forEach(function (m) {
            ids.add(m.id);
            upsert(m);
          });
          state.messages.forEach(function (r, mid) {
            if (!r.data._temp && !ids.has(mid)) state.messages.delete(mid);
          });
          if (data.title !== state.title) {
            state.title = data.title;
            renderTitle();
          }
          state.streamingKey = ""; // tell the hub again
        },
        function (err) {
          if (token === state.loadToken && err.status === 404) showNotice(err);
        }
      )
      .then(function () {
        resyncing = null;
        if (token === state.loadToken) {
          release(token);
          afterChange();
        }
      });
    return resyncing;
  }

  var goneTimer = 0;
  function checkGone() {
    if (Date.now() - goneTimer < 10000) return;
    goneTimer = Date.now();
    resync();
  }

  /* ---------------------------------------------------------- the sidebar */

  function openSidebar() {
    root.classList.add("sidebar-open");
    els.scrim.hidden = false;
    els.toggle.setAttribute("aria-expanded", "true");
  }

  function closeSidebar() {
    root.classList.remove("sidebar-open");
    els.scrim.hidden = true;
    els.toggle.setAttribute("aria-expanded", "false");
  }

  /* --------------------------------------------------------------- events */

  els.form.addEventListener("submit", function (e) {
    e.preventDefault();
    submit();
  });
  els.input.addEventListener("keydown", function (e) {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing && e.keyCode !== 229) {
      e.preventDefault();
      submit();
    }
  });
  els.input.addEventListener("input", function () {
    autosize();
    updateComposer();
  });
  els.stop.addEventListener("click", stop);
  function newChat() {
    closeSidebar();
    openConversation(null, state.convId != null || location.pathname !== "/chat/");
  }
  els.newChat.addEventListener("click", newChat);
  els.headerNewChat.addEventListener("click", newChat);
  els.toggle.addEventListener("click", function () {
    if (root.classList.contains("sidebar-open")) closeSidebar();
    else openSidebar();
  });
  els.scrim.addEventListener("click", closeSidebar);
  els.jump.addEventListener("click", scrollToBottom);
  els.scroller.addEventListener(
    "scroll",
    function () {
      state.stick = nearBottom();
      els.jump.hidden = state.stick;
    },
    { passive: true }
  );
  els.empty.addEventListener("click", function (e) {
    var card = e.target.closest("[data-prompt]");
    if (!card) return;
    els.input.value = card.getAttribute("data-prompt");
    autosize();
    updateComposer();
    submit();
  });
  els.thread.addEventListener("click", function (e) {
    var button = e.target.closest("[data-copy-code]");
    if (!button) return;
    var block = button.closest(".code-block");
    var code = block && block.querySelector("pre");
    if (code) {
      copyText(code.textContent, button);
      button.textContent = "Copied";
      setTimeout(function () {
        button.textContent = "Copy";
      }, 1500);
    }
  });
  els.dialogConfirm.addEventListener("click", function (e) {
    e.preventDefault();
    confirmDelete();
  });
  els.dialog.addEventListener("close", function () {
    deleting = null;
  });
  window.addEventListener("popstate", function () {
    var m = /^\/chat\/(\d+)\/$/.exec(location.pathname);
    var id = m ? Number(m[1]) : null;
    if (id !== state.convId) openConversation(id, false);
  });
  window.addEventListener("online", function () {
    setConnState(state.connState);
  });
  window.addEventListener("offline", function () {
    setConnState(state.connState);
  });

  // The hub gives its one conversation stream to the tab used last.
  var lastActive = 0;
  function active() {
    var now = Date.now();
    if (now - lastActive < 1000) return;
    lastActive = now;
    hub.post({ type: "active" });
  }
  window.addEventListener("focus", function () {
    active();
    refreshList(0);
  });
  document.addEventListener("pointerdown", active, true);
  document.addEventListener("keydown", active, true);
  document.addEventListener("visibilitychange", function () {
    hub.post({ type: "visibility", hidden: document.hidden });
    if (!document.hidden) {
      flushText();
      refreshList(0);
      state.streamingKey = ""; // the hub may have let go of them meanwhile
      reportStreaming();
    }
  });
  window.addEventListener("pagehide", function () {
    hub.post({ type: "bye" });
  });
  window.addEventListener("pageshow", function (e) {
    if (e.persisted) location.reload();
  });

  // Safety net: an answer that has gone quiet is reloaded over the API.
  setInterval(function () {
    var quiet = false;
    state.messages.forEach(function (r) {
      if (r.data.status === "streaming" && Date.now() - r.touched > TEXT_QUIET_MS) {
        quiet = true;
        touched(r);
      }
    });
    if (quiet) resync();
  }, 5000);

  /* ---------------------------------------------------------------- start */

  var initial = root.getAttribute("data-conversation");
  var initialId = initial ? Number(initial) : null;
  hub.start();
  api.list().then(
    function (data) {
      state.conversations = (data && data.results) || [];
      renderList();
      if (state.convId != null && !state.title) {
        var c = state.conversations.find(function (x) {
          return x.id === state.convId;
        });
        if (c) {
          state.title = c.title;
          renderTitle();
        }
      }
    },
    function (err) {
      toast(err.message || "Could not load your conversations.", "error");
    }
  );
  history.replaceState({ conversation: initialId }, "", convUrl(initialId));
  openConversation(initialId, false);
  autosize();
  window.ssechatChat = { state: state, hubTab: hub.tab };
})();
