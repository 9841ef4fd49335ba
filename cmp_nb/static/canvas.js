// The front end of cmp_nb.widgets.FlowCanvas (and AnnotationCanvas), loaded by anywidget as an ES module.
// Self-contained: no imports and no requests; the pictures arrive as data URLs in synced traits.
// Edits are [kind, x0, y0, x1, y1] in IMAGE pixels; only a finished edit crosses to Python, as the whole
// edit list plus a sequence number in one update (see commit below).

const COLORS = { arrow: '#ff2020', static: '#00e5ff', pos: '#22dd22', neg: '#ff2020' };

function mk(tag, cls, parent) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (parent) parent.appendChild(e);
  return e;
}

function drawArrow(ctx, x0, y0, x1, y1, color, width) {
  const a = Math.atan2(y1 - y0, x1 - x0), h = Math.max(7, 3 * width);
  ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = width;
  ctx.beginPath(); ctx.moveTo(x0, y0); ctx.lineTo(x1, y1); ctx.stroke();
  ctx.beginPath(); ctx.moveTo(x1, y1);
  ctx.lineTo(x1 - h * Math.cos(a - 0.45), y1 - h * Math.sin(a - 0.45));
  ctx.lineTo(x1 - h * Math.cos(a + 0.45), y1 - h * Math.sin(a + 0.45));
  ctx.closePath(); ctx.fill();
}

function drawDot(ctx, x, y, color) {
  ctx.beginPath(); ctx.arc(x, y, 5, 0, 2 * Math.PI);
  ctx.fillStyle = color; ctx.fill();
  ctx.lineWidth = 1.5; ctx.strokeStyle = '#000'; ctx.stroke();
}

// edits are [kind, x0, y0, x1, y1] in IMAGE pixels; sx, sy map them to canvas pixels
function drawEdits(ctx, edits, sx, sy, onResult) {
  for (const [kind, x0, y0, x1, y1] of edits) {
    const color = onResult ? '#000' : COLORS.arrow;
    if (kind === 'arrow') drawArrow(ctx, x0 * sx, y0 * sy, x1 * sx, y1 * sy, color, 2.5);
    else drawDot(ctx, x0 * sx, y0 * sy, COLORS[kind] || '#fff');
  }
}

function render({ model, el }) {
  el.classList.add('cmp-canvas');
  const bar = mk('div', 'cmp-bar', el);
  const undoB = mk('button', 'cmp-undo', bar); undoB.textContent = 'Undo';
  const clearB = mk('button', 'cmp-clear', bar); clearB.textContent = 'Clear';
  const signB = mk('button', 'cmp-sign', bar);
  const status = mk('span', 'cmp-status', bar);
  const row = mk('div', 'cmp-row', el);
  const left = mk('div', 'cmp-panel', row);
  const cv = mk('canvas', 'cmp-input', left);
  const right = mk('div', 'cmp-panel', row);
  const res = mk('img', 'cmp-result', right);
  const ov = mk('canvas', 'cmp-overlay', right);
  const legend = mk('img', 'cmp-legend', row);
  const help = mk('div', 'cmp-help', el);
  const ctx = cv.getContext('2d'), octx = ov.getContext('2d');
  const bg = new Image();
  const times = {};            // seq -> {sent, shown} (performance.now() ms), read by tests
  el.cmpTimes = times;
  let sign = 'pos', drag = null, W = 1, H = 1, dw = 1, dh = 1;

  function redraw(preview) {
    ctx.clearRect(0, 0, dw, dh);
    if (bg.complete && bg.naturalWidth) ctx.drawImage(bg, 0, 0, dw, dh);
    const sx = dw / W, sy = dh / H, edits = model.get('edits') || [];
    drawEdits(ctx, edits, sx, sy, false);
    if (preview) {
      ctx.setLineDash([6, 4]);
      const [[px0, py0], [px1, py1]] = preview;
      drawArrow(ctx, px0 * sx, py0 * sy, px1 * sx, py1 * sy, '#ffe000', 2);
      ctx.setLineDash([]);
    }
    octx.clearRect(0, 0, dw, dh);
    drawEdits(octx, edits, sx, sy, true);
  }

  function layout() {
    W = Math.max(1, model.get('img_width')); H = Math.max(1, model.get('img_height'));
    // the display size comes from Python (both sides, so a capped height maps back exactly)
    dw = Math.max(1, model.get('display_width'));
    dh = Math.max(1, model.get('display_height') || Math.round(dw * H / W));
    for (const c of [cv, ov]) {
      c.width = dw; c.height = dh; c.style.width = dw + 'px'; c.style.height = dh + 'px';
    }
    res.style.width = dw + 'px'; res.style.height = dh + 'px';
    const annotate = model.get('mode') === 'annotate';
    legend.style.display = annotate ? 'none' : '';
    signB.style.display = annotate ? '' : 'none';
    signB.textContent = sign === 'pos' ? 'clicks: positive (+)' : 'clicks: negative (-)';
    help.textContent = annotate
      ? 'click: positive point; shift-click, right-click or the toggle: negative point'
      : 'drag: arrow (this pixel moves there); click: static point (this pixel stays)';
    redraw();
  }

  function toImage(ev) {
    const r = cv.getBoundingClientRect();
    const x = (ev.clientX - r.left) * W / r.width, y = (ev.clientY - r.top) * H / r.height;
    return [Math.round(10 * x) / 10, Math.round(10 * y) / 10];
  }
  const clampIn = (p) => [Math.min(Math.max(p[0], 0), W - 1), Math.min(Math.max(p[1], 0), H - 1)];

  // the only way edits reach Python: the whole edit list plus a sequence number, in one update
  function commit(edits) {
    const seq = model.get('seq') + 1;
    model.set('edits', edits);
    model.set('seq', seq);
    model.save_changes();
    times[seq] = { sent: performance.now() };
    el.dataset.sentSeq = String(seq);
    redraw();
  }

  // called when Python announces a new result (shown_seq); the picture may be unchanged
  // (an error, or an identical mask), so "shown" is marked at once when there is nothing to load
  function showResult() {
    const url = model.get('result_url'), s = model.get('shown_seq');
    const mark = () => {
      if (times[s] && times[s].shown === undefined) times[s].shown = performance.now();
      el.dataset.shownSeq = String(s);
    };
    if (!url || (res.getAttribute('src') === url && res.complete)) { mark(); return; }
    res.onload = mark;
    res.src = url;
  }

  const onDown = (e) => {
    if (e.button !== 0 && e.button !== 2) return;
    e.preventDefault();
    if (cv.setPointerCapture) cv.setPointerCapture(e.pointerId);
    drag = { p: clampIn(toImage(e)), cx: e.clientX, cy: e.clientY, button: e.button, shift: e.shiftKey };
  };
  const onMove = (e) => {
    if (drag && model.get('mode') !== 'annotate') redraw([drag.p, toImage(e)]);
  };
  const onUp = (e) => {
    if (!drag) return;
    const d = drag, q = toImage(e);
    drag = null;
    const moved = Math.hypot(e.clientX - d.cx, e.clientY - d.cy) >= 4;
    const edits = (model.get('edits') || []).slice();
    if (model.get('mode') === 'annotate') {
      const neg = d.button === 2 || d.shift || sign === 'neg';
      edits.push([neg ? 'neg' : 'pos', d.p[0], d.p[1], d.p[0], d.p[1]]);
    } else if (moved) {
      edits.push(['arrow', d.p[0], d.p[1], q[0], q[1]]);
    } else {
      edits.push(['static', d.p[0], d.p[1], d.p[0], d.p[1]]);
    }
    commit(edits);
  };
  const onCancel = () => { drag = null; redraw(); };
  const noMenu = (e) => e.preventDefault();
  cv.addEventListener('pointerdown', onDown);
  cv.addEventListener('pointermove', onMove);
  cv.addEventListener('pointerup', onUp);
  cv.addEventListener('pointercancel', onCancel);
  cv.addEventListener('contextmenu', noMenu);
  undoB.addEventListener('click', () => {
    const e = model.get('edits') || [];
    if (e.length) commit(e.slice(0, -1));
  });
  clearB.addEventListener('click', () => { if ((model.get('edits') || []).length) commit([]); });
  signB.addEventListener('click', () => { sign = sign === 'pos' ? 'neg' : 'pos'; layout(); });
  bg.onload = () => redraw();

  const handlers = {
    'change:image_url': () => { bg.src = model.get('image_url'); },
    'change:legend_url': () => { legend.src = model.get('legend_url'); },
    'change:img_width': layout, 'change:img_height': layout,
    'change:display_width': layout, 'change:display_height': layout, 'change:mode': layout,
    'change:edits': () => redraw(),
    'change:shown_seq': showResult,
    'change:status': () => { status.textContent = model.get('status'); },
  };
  for (const [name, fn] of Object.entries(handlers)) model.on(name, fn);
  bg.src = model.get('image_url');
  legend.src = model.get('legend_url');
  status.textContent = model.get('status');
  layout();
  showResult();
  return () => { for (const [name, fn] of Object.entries(handlers)) model.off(name, fn); };
}

export default { render };
