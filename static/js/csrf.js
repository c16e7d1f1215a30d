/* window.ssechat: small helpers shared by every page.
 *
 *   ssechat.csrfToken()                          -> the token from <meta name="csrf-token">
 *   await ssechat.fetchJSON(url, {method, body}) -> parsed JSON (null for 204)
 *
 * fetchJSON sends `body` as JSON with the X-CSRFToken header and the session
 * cookie; on a non-2xx answer it throws an Error whose message is the
 * server's `detail` (error.status, error.code and error.data are set too).
 */
(function () {
  "use strict";

  var ns = (window.ssechat = window.ssechat || {});

  function cookie(name) {
    var match = document.cookie.match(new RegExp("(?:^|; )" + name + "=([^;]*)"));
    return match ? decodeURIComponent(match[1]) : "";
  }

  ns.csrfToken = function () {
    var meta = document.querySelector('meta[name="csrf-token"]');
    var token = meta ? meta.getAttribute("content") : "";
    if (!token || token === "NOTPROVIDED") token = cookie("csrftoken");
    return token;
  };

  ns.fetchJSON = async function (url, options) {
    options = options || {};
    var method = (options.method || (options.body !== undefined ? "POST" : "GET")).toUpperCase();
    var headers = Object.assign({ Accept: "application/json" }, options.headers || {});
    var init = { method: method, headers: headers, credentials: "same-origin" };
    if (options.signal) init.signal = options.signal;
    if (!/^(GET|HEAD|OPTIONS|TRACE)$/.test(method)) headers["X-CSRFToken"] = ns.csrfToken();
    if (options.body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = typeof options.body === "string" ? options.body : JSON.stringify(options.body);
    }

    var response;
    try {
      response = await fetch(url, init);
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      var netErr = new Error("Network error: the server could not be reached.");
      netErr.status = 0;
      netErr.cause = err;
      throw netErr;
    }

    var data = null;
    if (response.status !== 204) {
      var text = await response.text();
      if (text) {
        try {
          data = JSON.parse(text);
        } catch (e) {
          data = null;
        }
      }
    }
    if (!response.ok) {
      var detail = data && (data.detail || data.error);
      var error = new Error(detail || "Request failed (" + response.status + " " + response.statusText + ")");
      error.status = response.status;
      error.code = data && data.error;
      error.data = data;
      throw error;
    }
    return data;
  };
})();
