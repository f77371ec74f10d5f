// loralab ui: live parts of the page, no libraries. Every element with data-live="URL" is fetched again every few
// seconds and replaced when the server's HTML changed (the server escapes everything it puts there); ticked
// checkboxes stay ticked. An element with data-reload="MS" reloads the page after MS milliseconds.
(function () {
  "use strict";
  var PERIOD = 3000;
  var offline = document.getElementById("offline-note");

  function ticked(element) {
    var values = {};
    element.querySelectorAll("input[type=checkbox]:checked").forEach(function (box) { values[box.value] = true; });
    return values;
  }

  function refresh(element) {
    return fetch(element.getAttribute("data-live"), { headers: { "Accept": "text/html" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.text();
      })
      .then(function (html) {
        if (offline) { offline.hidden = true; }
        if (html === element.getAttribute("data-last")) { return; }
        var keep = ticked(element);
        element.innerHTML = html;
        element.setAttribute("data-last", html);
        element.querySelectorAll("input[type=checkbox]").forEach(function (box) {
          if (keep[box.value]) { box.checked = true; }
        });
      })
      .catch(function () { if (offline) { offline.hidden = false; } });
  }

  function tick() {
    if (document.hidden) { return; }
    document.querySelectorAll("[data-live]").forEach(refresh);
  }

  setInterval(tick, PERIOD);

  var reload = document.querySelector("[data-reload]");
  if (reload) {
    setTimeout(function () { window.location.reload(); }, parseInt(reload.getAttribute("data-reload"), 10) || 2000);
  }
})();
