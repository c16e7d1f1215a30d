/* A small Markdown renderer that builds DOM nodes, for model answers.
 *
 *   ssechat.markdown.render(text)          -> DocumentFragment
 *   ssechat.markdown.renderInto(el, text)  -> replaces el's children
 *
 * Safety by construction: every piece of text becomes a Text node
 * (createTextNode / textContent) and every element is made with createElement
 * from a fixed list of tags. Nothing is ever parsed as HTML, so `<script>`,
 * `<img onerror=...>` and friends show up as the characters they are. Links
 * keep only http:, https: and mailto: targets; images become links (a model
 * answer never makes the browser fetch anything).
 *
 * Supported: paragraphs (a single newline is a line break), ATX headings,
 * **bold**, *em*, ~~strike~~, `code`, fenced code blocks (``` or ~~~, with a
 * language), bullet and ordered lists (nested by indentation, task boxes),
 * blockquotes, horizontal rules, GFM tables, [links](https://...), <autolinks>
 * and bare URLs, backslash escapes. An unclosed fence renders as a code block
 * so far, which is what a streaming answer needs.
 */
(function () {
  "use strict";

  var ns = (window.ssechat = window.ssechat || {});

  var FENCE = /^ {0,3}(`{3,}|~{3,})[ \t]*([^\s`]*)[^`]*$/;
  var HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
  var HR = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
  var QUOTE = /^ {0,3}> ?(.*)$/;
  var BULLET = /^( {0,3})([-*+])([ \t]+|$)(.*)$/;
  var ORDERED = /^( {0,3})(\d{1,9})([.)])([ \t]+|$)(.*)$/;
  var TABLE_SEP = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
  var SAFE_LANG = /[^A-Za-z0-9_+#.-]/g;
  var MAX_DEPTH = 12;
  var MAX_LABEL = 1000; // longest [link text] looked at
  var MAX_TARGET = 2000; // longest (link target) looked at

  function el(tag, className) {
    var node = document.createElement(tag);
    if (className) node.className = className;
    return node;
  }

  function text(value) {
    return document.createTextNode(value);
  }

  function isBlank(line) {
    return /^[ \t]*$/.test(line);
  }

  function indentOf(line) {
    var n = 0;
    for (var i = 0; i < line.length; i++) {
      if (line[i] === " ") n += 1;
      else if (line[i] === "\t") n += 4 - (n % 4);
      else break;
    }
    return n;
  }

  // Remove up to `count` columns of leading indentation.
  function dedent(line, count) {
    var col = 0;
    var i = 0;
    while (i < line.length && col < count) {
      if (line[i] === " ") col += 1;
      else if (line[i] === "\t") col += 4 - (col % 4);
      else break;
      i += 1;
    }
    return line.slice(i);
  }

  function listMarker(line) {
    var m = BULLET.exec(line);
    if (m) {
      return { ordered: false, bullet: m[2], indent: m[1].length, width: m[1].length + 1 + (m[4] ? m[3].length : 1), rest: m[4] };
    }
    m = ORDERED.exec(line);
    if (m) {
      return {
        ordered: true,
        bullet: m[3],
        start: parseInt(m[2], 10),
        indent: m[1].length,
        width: m[1].length + m[2].length + 1 + (m[5] ? m[4].length : 1),
        rest: m[5],
      };
    }
    return null;
  }

  function startsBlock(line, inParagraph) {
    if (FENCE.test(line) || HEADING.test(line) || HR.test(line) || QUOTE.test(line)) return true;
    var marker = listMarker(line);
    if (!marker) return false;
    // As in CommonMark, an ordered list interrupts a paragraph only when it starts at 1,
    // and an empty item never does.
    if (inParagraph && (!marker.rest || (marker.ordered && marker.start !== 1))) return false;
    return true;
  }

  function splitRow(line) {
    var s = line.trim();
    if (s.charAt(0) === "|") s = s.slice(1);
    if (s.charAt(s.length - 1) === "|" && s.charAt(s.length - 2) !== "\\") s = s.slice(0, -1);
    var cells = [];
    var cur = "";
    var inCode = false;
    for (var i = 0; i < s.length; i++) {
      var c = s[i];
      if (c === "\\" && s[i + 1] === "|") {
        cur += "|";
        i += 1;
      } else if (c === "`") {
        inCode = !inCode;
        cur += c;
      } else if (c === "|" && !inCode) {
        cells.push(cur.trim());
        cur = "";
      } else {
        cur += c;
      }
    }
    cells.push(cur.trim());
    return cells;
  }

  /* ------------------------------------------------------------ blocks */

  function parseBlocks(lines, parent, depth) {
    var i = 0;
    var n = lines.length;
    while (i < n) {
      var line = lines[i];
      if (isBlank(line)) {
        i += 1;
        continue;
      }
      var m;

      // Fenced code block (an unclosed fence runs to the end: streaming).
      if ((m = FENCE.exec(line))) {
        var fence = m[1];
        var lang = (m[2] || "").replace(SAFE_LANG, "").slice(0, 32);
        var openIndent = indentOf(line);
        var body = [];
        i += 1;
        var closed = false;
        while (i < n) {
          var l = lines[i];
          var close = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(l);
          if (close && close[1].charAt(0) === fence.charAt(0) && close[1].length >= fence.length) {
            closed = true;
            i += 1;
            break;
          }
          body.push(dedent(l, openIndent));
          i += 1;
        }
        parent.appendChild(codeBlock(body.join("\n"), lang, !closed));
        continue;
      }

      if ((m = HEADING.exec(line))) {
        var h = el("h" + m[1].length);
        inline(m[2] || "", h, depth);
        parent.appendChild(h);
        i += 1;
        continue;
      }

      if (HR.test(line)) {
        parent.appendChild(el("hr"));
        i += 1;
        continue;
      }

      if (QUOTE.test(line)) {
        var quoted = [];
        while (i < n && !isBlank(lines[i])) {
          var q = QUOTE.exec(lines[i]);
          if (q) quoted.push(q[1]);
          else if (startsBlock(lines[i], true)) break;
          else quoted.push(lines[i]); // lazy continuation
          i += 1;
        }
        var bq = el("blockquote");
        if (depth < MAX_DEPTH) parseBlocks(quoted, bq, depth + 1);
        else bq.appendChild(text(quoted.join("\n")));
        parent.appendChild(bq);
        continue;
      }

      var marker = listMarker(line);
      if (marker) {
        i = parseList(lines, i, parent, depth, marker);
        continue;
      }

      // Table: a header row, a separator row, then rows.
      if (line.indexOf("|") !== -1 && i + 1 < n && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].indexOf("-") !== -1) {
        var head = splitRow(line);
        var aligns = splitRow(lines[i + 1]).map(function (cell) {
          var left = cell.charAt(0) === ":";
          var right = cell.charAt(cell.length - 1) === ":";
          return left && right ? "center" : right ? "right" : left ? "left" : "";
        });
        if (aligns.length === head.length) {
          i += 2;
          var rows = [];
          while (i < n && !isBlank(lines[i]) && lines[i].indexOf("|") !== -1 && !startsBlock(lines[i], true)) {
            rows.push(splitRow(lines[i]));
            i += 1;
          }
          parent.appendChild(table(head, aligns, rows, depth));
          continue;
        }
      }

      // Paragraph: up to a blank line or the start of another block.
      var para = [line];
      i += 1;
      while (i < n && !isBlank(lines[i]) && !startsBlock(lines[i], true)) {
        if (lines[i].indexOf("|") !== -1 && i + 1 < n && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].indexOf("-") !== -1) break;
        para.push(lines[i]);
        i += 1;
      }
      var p = el("p");
      inline(
        para
          .map(function (s) { return s.replace(/^[ \t]+/, ""); })
          .join("\n"),
        p,
        depth
      );
      parent.appendChild(p);
    }
  }

  function parseList(lines, i, parent, depth, first) {
    var n = lines.length;
    var list = el(first.ordered ? "ol" : "ul");
    if (first.ordered && first.start !== 1) list.setAttribute("start", String(first.start));
    var loose = false;
    var items = [];

    while (i < n) {
      var marker = listMarker(lines[i]);
      if (!marker || marker.ordered !== first.ordered || marker.bullet !== first.bullet) break;
      if (marker.indent > first.indent + 3) break;
      var width = marker.width;
      var itemLines = [marker.rest];
      i += 1;
      var sawBlank = false;
      while (i < n) {
        var l = lines[i];
        if (isBlank(l)) {
          sawBlank = true;
          itemLines.push("");
          i += 1;
          continue;
        }
        if (indentOf(l) >= width) {
          if (sawBlank) loose = true;
          itemLines.push(dedent(l, width));
          sawBlank = false;
          i += 1;
          continue;
        }
        if (sawBlank || listMarker(l)) break;
        // A lazy continuation line of the item's paragraph.
        if (!startsBlock(l, true)) {
          itemLines.push(l);
          i += 1;
          continue;
        }
        break;
      }
      while (itemLines.length && isBlank(itemLines[itemLines.length - 1])) itemLines.pop();
      items.push(itemLines);
      // A blank line between two items makes the list loose.
      if (sawBlank && i < n) {
        var next = listMarker(lines[i]);
        if (next && next.ordered === first.ordered && next.bullet === first.bullet) loose = true;
      }
    }

    items.forEach(function (itemLines) {
      var li = el("li");
      var task = /^\[([ xX])\][ \t]+/.exec(itemLines[0] || "");
      if (task) {
        var box = el("input");
        box.type = "checkbox";
        box.disabled = true;
        box.checked = task[1] !== " ";
        li.className = "task";
        li.appendChild(box);
        li.appendChild(text(" "));
        itemLines[0] = itemLines[0].slice(task[0].length);
      }
      if (depth >= MAX_DEPTH) {
        li.appendChild(text(itemLines.join("\n")));
      } else {
        var holder = document.createDocumentFragment();
        parseBlocks(itemLines, holder, depth + 1);
        // Tight lists show their paragraphs without <p> margins.
        if (!loose) {
          Array.prototype.slice.call(holder.childNodes).forEach(function (child) {
            if (child.nodeName === "P") {
              while (child.firstChild) holder.insertBefore(child.firstChild, child);
              holder.removeChild(child);
            }
          });
        }
        li.appendChild(holder);
      }
      list.appendChild(li);
    });
    parent.appendChild(list);
    return i;
  }

  function codeBlock(source, lang, open) {
    var wrap = el("div", "code-block" + (open ? " code-open" : ""));
    var bar = el("div", "code-bar");
    var label = el("span", "code-lang");
    label.textContent = lang || "text";
    var copy = el("button", "code-copy");
    copy.type = "button";
    copy.setAttribute("data-copy-code", "");
    copy.setAttribute("aria-label", "Copy code");
    copy.textContent = "Copy";
    bar.appendChild(label);
    bar.appendChild(copy);
    var pre = el("pre");
    var code = el("code");
    if (lang) code.className = "language-" + lang;
    code.textContent = source;
    pre.appendChild(code);
    wrap.appendChild(bar);
    wrap.appendChild(pre);
    return wrap;
  }

  function table(head, aligns, rows, depth) {
    var wrap = el("div", "table-scroll");
    var t = el("table");
    var thead = el("thead");
    var tr = el("tr");
    head.forEach(function (cell, k) {
      var th = el("th");
      if (aligns[k]) th.style.textAlign = aligns[k];
      inline(cell, th, depth);
      tr.appendChild(th);
    });
    thead.appendChild(tr);
    t.appendChild(thead);
    var tbody = el("tbody");
    rows.forEach(function (row) {
      var r = el("tr");
      for (var k = 0; k < head.length; k++) {
        var td = el("td");
        if (aligns[k]) td.style.textAlign = aligns[k];
        inline(row[k] || "", td, depth);
        r.appendChild(td);
      }
      tbody.appendChild(r);
    });
    t.appendChild(tbody);
    wrap.appendChild(t);
    return wrap;
  }

  /* ------------------------------------------------------------ inline */

  var ESCAPABLE = "\\`*_{}[]()#+-.!|~<>\"'$%&,:;=?@^/";
  var URL_RE = /^https?:\/\/[^\s<>"'`]+/i;
  var EMAIL_LINK = /^mailto:[^\s<>"'`]+$/i;

  function safeHref(raw) {
    var href = String(raw || "").trim();
    if (!href) return null;
    if (EMAIL_LINK.test(href)) return href;
    try {
      var url = new URL(href);
      if (url.protocol === "http:" || url.protocol === "https:") return url.href;
    } catch (e) {
      return null;
    }
    return null;
  }

  function link(href, label, parent, depth) {
    var safe = safeHref(href);
    if (!safe) {
      inline(label, parent, depth);
      return;
    }
    var a = el("a");
    a.href = safe;
    a.target = "_blank";
    a.rel = "noopener noreferrer nofollow";
    if (depth < MAX_DEPTH) inline(label || safe, a, depth + 1);
    else a.textContent = label || safe;
    parent.appendChild(a);
  }

  // Find the "](" target of a [label](target) starting at `start` (the "[").
  function parseLinkAt(src, start) {
    var depthB = 0;
    var i = start;
    var stop = Math.min(src.length, start + MAX_LABEL);
    for (; i < stop; i++) {
      var c = src[i];
      if (c === "\\") {
        i += 1;
        continue;
      }
      if (c === "`") {
        var close = src.indexOf("`", i + 1);
        if (close === -1) break;
        i = close;
        continue;
      }
      if (c === "[") depthB += 1;
      else if (c === "]") {
        depthB -= 1;
        if (depthB === 0) break;
      }
    }
    if (i >= stop || src[i] !== "]" || src[i + 1] !== "(") return null;
    var label = src.slice(start + 1, i);
    var j = i + 2;
    var parens = 0;
    var end = Math.min(src.length, j + MAX_TARGET);
    for (; j < end; j++) {
      var d = src[j];
      if (d === "\\") {
        j += 1;
        continue;
      }
      if (d === "(") parens += 1;
      else if (d === ")") {
        if (parens === 0) break;
        parens -= 1;
      } else if (d === "\n") return null;
    }
    if (j >= end) return null;
    var target = src.slice(i + 2, j).trim();
    var title = /^(\S+)\s+["'(].*["')]$/.exec(target);
    if (title) target = title[1];
    if (target.charAt(0) === "<" && target.charAt(target.length - 1) === ">") target = target.slice(1, -1);
    return { label: label, href: target, end: j + 1 };
  }

  // Emphasis delimiters: the index of the closer of `delim` after `from`, or -1.
  // A run of the delimiter character closes from its end ("***" closes "**"
  // and leaves "*" inside); "**" inside "*...*" is a pair of its own.
  function findCloser(src, delim, from, memo) {
    // No closer after `from` means none after any later start either: remember it,
    // so that a run of openers without closers stays linear.
    if (memo[delim] !== undefined && from >= memo[delim]) return -1;
    var ch = delim.charAt(0);
    var i = from;
    while (i < src.length) {
      var c = src[i];
      if (c === "\\") {
        i += 2;
        continue;
      }
      if (c === "`") {
        var tick = /^`+/.exec(src.slice(i))[0];
        var close = src.indexOf(tick, i + tick.length);
        if (close !== -1) {
          i = close + tick.length;
          continue;
        }
      }
      if (c === ch) {
        var r = 1;
        while (src[i + r] === ch) r += 1;
        var closes = i > from && !/\s/.test(src[i - 1]);
        if (ch === "_" && /[A-Za-z0-9]/.test(src[i + r] || "")) closes = false;
        if (closes) {
          if (delim.length === 1 && r === 1) return i;
          if (delim.length === 1 && r >= 3) return i + r - 1;
          if (delim.length === 2 && r >= 2) return i + r - 2;
        }
        i += r;
        continue;
      }
      i += 1;
    }
    memo[delim] = Math.min(from, memo[delim] === undefined ? from : memo[delim]);
    return -1;
  }

  function inline(src, parent, depth) {
    var memo = {};
    var nextClose = -2; // index of the next "](" at or after the last look, -1: none
    // A link needs a "](" within reach: finding it once per stretch keeps a long
    // run of "[" linear.
    function linkPossible(at) {
      if (nextClose === -2 || (nextClose !== -1 && nextClose < at)) nextClose = src.indexOf("](", at);
      return nextClose !== -1 && nextClose - at <= MAX_LABEL;
    }
    var buf = "";
    function flush() {
      if (buf) {
        parent.appendChild(text(buf));
        buf = "";
      }
    }
    var i = 0;
    while (i < src.length) {
      var c = src[i];
      var rest;

      if (c === "\\" && i + 1 < src.length) {
        if (src[i + 1] === "\n") {
          flush();
          parent.appendChild(el("br"));
          i += 2;
          continue;
        }
        if (ESCAPABLE.indexOf(src[i + 1]) !== -1) {
          buf += src[i + 1];
          i += 2;
          continue;
        }
      }

      if (c === "\n") {
        buf = buf.replace(/ +$/, "");
        flush();
        parent.appendChild(el("br"));
        i += 1;
        while (src[i] === " ") i += 1;
        continue;
      }

      if (c === "`") {
        var run = /^`+/.exec(src.slice(i))[0];
        var close = src.indexOf(run, i + run.length);
        // The closing run must be exactly as long.
        while (close !== -1 && src[close + run.length] === "`") {
          var more = /^`+/.exec(src.slice(close))[0];
          close = src.indexOf(run, close + more.length);
        }
        if (close !== -1) {
          flush();
          var code = el("code");
          var inner = src.slice(i + run.length, close).replace(/\n/g, " ");
          if (/^ .* $/.test(inner) && inner.trim()) inner = inner.slice(1, -1);
          code.textContent = inner;
          parent.appendChild(code);
          i = close + run.length;
          continue;
        }
        buf += run;
        i += run.length;
        continue;
      }

      if (depth < MAX_DEPTH && (c === "*" || c === "_" || c === "~")) {
        var delim = null;
        if (c === "~" && src[i + 1] === "~") delim = "~~";
        else if ((c === "*" || c === "_") && src[i + 1] === c) delim = c + c;
        else if (c === "*" || c === "_") delim = c;
        var opensOk =
          delim &&
          src[i + delim.length] !== undefined &&
          !/\s/.test(src[i + delim.length]) &&
          !(c === "_" && i > 0 && /[A-Za-z0-9]/.test(src[i - 1]));
        if (opensOk) {
          var end = findCloser(src, delim, i + delim.length, memo);
          if (end !== -1) {
            flush();
            var tag = delim === "~~" ? "del" : delim.length === 2 ? "strong" : "em";
            var node = el(tag);
            inline(src.slice(i + delim.length, end), node, depth + 1);
            parent.appendChild(node);
            i = end + delim.length;
            continue;
          }
        }
        if (delim) {
          buf += delim;
          i += delim.length;
          continue;
        }
      }

      if (c === "!" && src[i + 1] === "[" && linkPossible(i + 1)) {
        var img = parseLinkAt(src, i + 1);
        if (img) {
          // Images are shown as links: a model answer never loads anything.
          flush();
          link(img.href, img.label || img.href, parent, depth);
          i = img.end;
          continue;
        }
      }

      if (c === "[" && linkPossible(i)) {
        var lk = parseLinkAt(src, i);
        if (lk) {
          flush();
          link(lk.href, lk.label, parent, depth);
          i = lk.end;
          continue;
        }
      }

      if (c === "<") {
        var auto = /^<((?:https?:\/\/|mailto:)[^\s<>]+)>/i.exec(src.slice(i));
        if (auto) {
          flush();
          link(auto[1], auto[1], parent, MAX_DEPTH);
          i += auto[0].length;
          continue;
        }
      }

      if ((c === "h" || c === "H") && (i === 0 || /[\s(*_~]/.test(src[i - 1]))) {
        rest = URL_RE.exec(src.slice(i));
        if (rest) {
          var url = rest[0].replace(/[.,;:!?)\]*_~]+$/, "");
          // Keep a closing parenthesis that belongs to the URL: (see https://x.org/a_(b)).
          var opened = (url.match(/\(/g) || []).length;
          var closedP = (url.match(/\)/g) || []).length;
          var after = rest[0].slice(url.length);
          while (opened > closedP && after.charAt(0) === ")") {
            url += ")";
            after = after.slice(1);
            closedP += 1;
          }
          flush();
          link(url, url, parent, MAX_DEPTH);
          i += url.length;
          continue;
        }
      }

      buf += c;
      i += 1;
    }
    flush();
  }

  function render(source) {
    var frag = document.createDocumentFragment();
    var src = String(source == null ? "" : source).replace(/\r\n?/g, "\n").replace(/\u0000/g, "\uFFFD");
    parseBlocks(src.split("\n"), frag, 0);
    return frag;
  }

  ns.markdown = {
    render: render,
    renderInto: function (target, source) {
      target.replaceChildren(render(source));
    },
  };
})();
