/* tiahnm report viewer: OpenSeadragon on pre-rendered DZI tiles, the patch-score
 * overlay drawn into a canvas (one pixel per patch cell), annotation outlines as SVG.
 * Data: window.TIAHNM_REPORT (report_files/data.js). No network. */
(function () {
  "use strict";
  var R = window.TIAHNM_REPORT;
  var probe = { opened: 0, tilesLoaded: 0, maxLevel: -1, overlayPixels: 0, slide: null };
  window.tiahnmProbe = probe;
  if (!R || !R.slides || !R.slides.length || !window.OpenSeadragon) { return; }
  var state = { slide: null, canvas: null, threshold: 0, opacity: 0.55 };
  var viewer = OpenSeadragon({
    id: "viewer",
    prefixUrl: "report_files/openseadragon/images/",
    drawer: "canvas",
    showNavigator: true,
    maxZoomPixelRatio: 4,
    visibilityRatio: 0.5,
    crossOriginPolicy: false,
    preserveImageSizeOnResize: true
  });
  window.tiahnmViewer = viewer;
  var $ = function (id) { return document.getElementById(id); };

  function colour(v) {
    var i = Math.max(0, Math.min(255, Math.round(v * 255)));
    return R.lut[i];
  }

  function drawOverlay() {
    var s = state.slide, g = s.grid, c = state.canvas;
    if (!c) { return; }
    var ctx = c.getContext("2d");
    var img = ctx.createImageData(g.cols, g.rows);
    var drawn = 0;
    for (var i = 0; i < g.values.length; i++) {
      var v = g.values[i];
      if (v === null || v < state.threshold) { continue; }
      var rgb = colour(v);
      img.data[4 * i] = rgb[0];
      img.data[4 * i + 1] = rgb[1];
      img.data[4 * i + 2] = rgb[2];
      img.data[4 * i + 3] = 255;
      drawn++;
    }
    ctx.putImageData(img, 0, 0);
    c.style.opacity = String(state.opacity);
    probe.overlayPixels = drawn;
    var t = state.threshold, txt = t.toFixed(2);
    if (s.raw) { txt += " (score " + (s.raw[0] + t * (s.raw[1] - s.raw[0])).toPrecision(3) + ")"; }
    $("threshold-value").textContent = txt;
    $("overlay-count").textContent = drawn + " of " + s.n_patches + " patches painted";
  }

  function outlineSvg(s) {
    var ns = "http://www.w3.org/2000/svg";
    var svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 " + s.level0[0] + " " + s.level0[1]);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("class", "outlines");
    s.outlines.forEach(function (ring) {
      var p = document.createElementNS(ns, "polygon");
      p.setAttribute("points", ring.map(function (xy) { return xy[0] + "," + xy[1]; }).join(" "));
      svg.appendChild(p);
    });
    return svg;
  }

  viewer.addHandler("open", function () {
    var s = state.slide, g = s.grid, W = s.level0[0];
    var c = document.createElement("canvas");
    c.width = g.cols;
    c.height = g.rows;
    c.className = "overlay";
    state.canvas = c;
    viewer.addOverlay({
      element: c,
      location: new OpenSeadragon.Rect(g.x / W, g.y / W, g.w / W, g.h / W)
    });
    if (s.outlines.length && $("outlines").checked) {
      viewer.addOverlay({
        element: outlineSvg(s),
        location: new OpenSeadragon.Rect(0, 0, 1, s.level0[1] / W)
      });
    }
    drawOverlay();
    probe.opened++;
    probe.slide = s.id;
  });
  viewer.addHandler("tile-loaded", function (e) {
    probe.tilesLoaded++;
    probe.maxLevel = Math.max(probe.maxLevel, e.tile.level);
  });

  function openSlide(i) {
    var s = R.slides[i];
    state.slide = s;
    $("slide").value = String(i);
    state.threshold = s.threshold;
    var th = $("threshold");
    th.min = String(s.range[0]);
    th.max = String(s.range[1]);
    th.step = String((s.range[1] - s.range[0]) / 200);
    th.value = String(s.threshold);
    $("scale-label").textContent = s.scale_label;
    $("slide-title").textContent = s.title;
    $("outlines-row").style.display = s.outlines.length ? "" : "none";
    state.canvas = null;
    viewer.open(s.tile_source);
  }

  var sel = $("slide");
  R.slides.forEach(function (s, i) {
    var o = document.createElement("option");
    o.value = String(i);
    o.textContent = s.option;
    sel.appendChild(o);
  });
  sel.addEventListener("change", function () { openSlide(Number(sel.value)); });
  $("threshold").addEventListener("input", function (e) {
    state.threshold = Number(e.target.value);
    drawOverlay();
  });
  $("opacity").addEventListener("input", function (e) {
    state.opacity = Number(e.target.value);
    if (state.canvas) { state.canvas.style.opacity = String(state.opacity); }
  });
  $("outlines").addEventListener("change", function () { openSlide(Number(sel.value)); });
  var bar = R.lut.map(function (c, i) {
    return "rgb(" + c.join(",") + ") " + (100 * i / 255).toFixed(1) + "%";
  });
  $("colour-bar").style.background = "linear-gradient(to right, " + bar.join(", ") + ")";
  window.tiahnmOpenSlide = openSlide;
  openSlide(0);
})();
