// Draws the dashboard's charts with the vendored Chart.js (chart-4.6.1.umd.min.js).
(function () {
  "use strict";
  var palette = ["#2563eb", "#db2777", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#dc2626"];

  var funnel = document.getElementById("funnel-chart");
  if (funnel) {
    var data = JSON.parse(funnel.dataset.funnel);
    new Chart(funnel, {
      type: "bar",
      data: {
        labels: data.labels,
        datasets: [{ label: "Contacts", data: data.values, backgroundColor: palette.slice(0, data.values.length) }],
      },
      options: {
        indexAxis: "y",
        animation: false,
        maintainAspectRatio: false,
        plugins: { legend: { display: false } },
        scales: { x: { beginAtZero: true, ticks: { precision: 0 } } },
      },
    });
  }

  var sizes = document.getElementById("segment-sizes-chart");
  if (sizes) {
    var series = JSON.parse(sizes.dataset.series);
    new Chart(sizes, {
      type: "line",
      data: {
        datasets: series.map(function (s, i) {
          return {
            label: s.label,
            data: s.points.map(function (p) { return { x: Date.parse(p.x), y: p.y }; }),
            borderColor: palette[i % palette.length],
            backgroundColor: palette[i % palette.length],
            stepped: true,
          };
        }),
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        scales: {
          x: { type: "linear", ticks: { callback: function (v) { return new Date(v).toLocaleString(); } } },
          y: { beginAtZero: true, ticks: { precision: 0 } },
        },
      },
    });
  }
})();
