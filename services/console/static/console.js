// The console's own script: draws the cluster map with Chart.js and ticks deadline countdowns.
(function () {
  "use strict";
  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
                 "#e377c2", "#7f7f7f", "#bcbd22"];

  function drawClusterMap(canvas) {
    var source = document.getElementById(canvas.dataset.chart);
    if (!source || typeof Chart === "undefined") { return; }
    var data = JSON.parse(source.textContent);
    var datasets = Object.keys(data.clusters).map(function (label, i) {
      var colour = PALETTE[i % PALETTE.length];
      return { label: "cluster " + label, data: data.clusters[label], backgroundColor: colour,
               borderColor: colour, pointRadius: 5 };
    });
    if (data.unassigned.length) {
      datasets.push({ label: "not assigned", data: data.unassigned, backgroundColor: "#999",
                      pointRadius: 4 });
    }
    if (data.centroids.length) {
      datasets.push({ label: "centroids", data: data.centroids, pointStyle: "crossRot",
                      pointRadius: 10, borderWidth: 3, borderColor: "#000",
                      backgroundColor: "#000" });
    }
    var existing = Chart.getChart(canvas);
    if (existing) { existing.destroy(); }
    new Chart(canvas, {
      type: "scatter",
      data: { datasets: datasets },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: { x: { title: { display: true, text: "PC 1" } },
                  y: { title: { display: true, text: "PC 2" } } },
        plugins: { tooltip: { callbacks: { label: function (ctx) {
          return (ctx.raw.name || "") + " (" + ctx.dataset.label + ")";
        } } } }
      }
    });
    canvas.dataset.drawn = "true";
  }

  function drawCharts() {
    document.querySelectorAll("canvas[data-chart]").forEach(drawClusterMap);
  }

  function tickDeadlines() {
    document.querySelectorAll("[data-deadline]").forEach(function (el) {
      var left = Math.round((Date.parse(el.dataset.deadline) - Date.now()) / 1000);
      if (isNaN(left)) { return; }
      if (left <= 0) { el.textContent = "passed (the round closes at the next check)"; return; }
      var m = Math.floor(left / 60), s = left % 60;
      el.textContent = "in " + m + " min " + (s < 10 ? "0" : "") + s + " s";
    });
  }

  // A weight slider shows its value beside its label.
  document.addEventListener("input", function (event) {
    var target = event.target;
    if (target.dataset && target.dataset.output) {
      var output = document.getElementById(target.dataset.output);
      if (output) { output.textContent = target.value; }
    }
  });

  document.addEventListener("DOMContentLoaded", function () {
    drawCharts();
    tickDeadlines();
    setInterval(tickDeadlines, 1000);
  });
  document.addEventListener("htmx:afterSettle", function () { drawCharts(); tickDeadlines(); });
})();
