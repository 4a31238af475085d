// machinery dashboard: refreshes the overview's tables and draws the throughput chart.
// No framework, no build step. Store data arrives as server-escaped HTML (tables) or numbers
// (chart), so nothing from the store is ever parsed as markup here.
(function () {
  "use strict";
  var REFRESH_MS = 5000;

  function refreshPart(el) {
    fetch(el.getAttribute("data-refresh"), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) { el.innerHTML = html; })
      .catch(function () { /* keep the last view; the next tick tries again */ });
  }

  function path(points, key, x, y) {
    return points.map(function (p, i) {
      return (i ? "L" : "M") + x(p.t).toFixed(1) + "," + y(p[key]).toFixed(1);
    }).join(" ");
  }

  function drawChart(box, data) {
    var w = 900, h = 180, left = 44, bottom = 20, top = 8;
    var pts = data.buckets || [];
    var span = data.window_seconds * 1000, end = data.now_ms, start = end - span;
    var max = 1;
    pts.forEach(function (p) { max = Math.max(max, p.tasks_per_sec, p.failures_per_sec); });
    max = Math.ceil(max * 1.15 * 10) / 10;
    var x = function (t) { return left + (t - start) / span * (w - left - 4); };
    var y = function (v) { return top + (1 - v / max) * (h - top - bottom); };
    var svg = '<svg viewBox="0 0 ' + w + " " + h + '" preserveAspectRatio="none" role="img" aria-label="throughput">';
    for (var i = 0; i <= 4; i++) {
      var v = max * i / 4, yy = y(v).toFixed(1);
      svg += '<line x1="' + left + '" x2="' + w + '" y1="' + yy + '" y2="' + yy + '" stroke="#e4e7ec"/>';
      svg += '<text x="' + (left - 6) + '" y="' + yy + '" font-size="10" text-anchor="end" dominant-baseline="middle" fill="#667085">' + v.toFixed(1) + "</text>";
    }
    for (var m = 0; m <= 15; m += 5) {
      var xx = x(end - m * 60000).toFixed(1);
      svg += '<text x="' + xx + '" y="' + (h - 4) + '" font-size="10" text-anchor="middle" fill="#667085">' + (m ? "-" + m + " min" : "now") + "</text>";
    }
    if (pts.length) {
      svg += '<path d="' + path(pts, "tasks_per_sec", x, y) + '" fill="none" stroke="#12805c" stroke-width="2"/>';
      svg += '<path d="' + path(pts, "failures_per_sec", x, y) + '" fill="none" stroke="#c4320a" stroke-width="2"/>';
    }
    svg += "</svg>";
    box.innerHTML = svg;
    var total = document.getElementById("chart-total");
    if (total) { total.textContent = (data.total_tasks || 0) + " tasks, " + (data.total_failures || 0) + " failed in the last 15 minutes"; }
  }

  function refreshChart(box) {
    fetch("/api/throughput", { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) { drawChart(box, data); box.setAttribute("data-drawn", String(Date.now())); })
      .catch(function () {});
  }

  function tick() {
    Array.prototype.forEach.call(document.querySelectorAll("[data-refresh]"), refreshPart);
    var chart = document.getElementById("chart");
    if (chart) { refreshChart(chart); }
  }

  var chart = document.getElementById("chart");
  if (chart) { refreshChart(chart); }
  if (chart || document.querySelector("[data-refresh]")) { setInterval(tick, REFRESH_MS); }

  // A task page whose task has not finished reloads itself until it has.
  var reload = document.querySelector("[data-reload]");
  if (reload) { setTimeout(function () { window.location.reload(); }, Number(reload.getAttribute("data-reload")) || 2000); }

  Array.prototype.forEach.call(document.querySelectorAll("form[data-confirm]"), function (form) {
    form.addEventListener("submit", function (e) {
      if (!window.confirm(form.getAttribute("data-confirm"))) { e.preventDefault(); }
    });
  });
})();
