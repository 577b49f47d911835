// A line chart of a few series over time on a <canvas>; no library.

const PAD = { left: 40, right: 12, top: 10, bottom: 24 };

// The smallest of 1, 2, 5 x 10^n that is >= value.
function niceStep(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5]) {
    if (step * power >= value) return step * power;
  }
  return 10 * power;
}

// Gridline spacing and axis top for counts up to `max`: whole numbers, 4 to 8 lines.
function axis(max) {
  const step = Math.max(1, niceStep(max / 4));
  return { step, top: Math.max(4 * step, step * Math.ceil(max / step)) };
}

// samples: [{t: ms, values: {name: number}}], oldest first.
// series: [{name, color}]. windowMs: how much time the x axis spans, ending now.
export function drawChart(canvas, samples, series, windowMs) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);

  const style = getComputedStyle(canvas);
  const grid = style.getPropertyValue('--grid').trim() || '#333';
  const text = style.getPropertyValue('--axis').trim() || '#999';
  const plotW = width - PAD.left - PAD.right;
  const plotH = height - PAD.top - PAD.bottom;
  const now = samples.length ? samples[samples.length - 1].t : Date.now();
  const start = now - windowMs;

  let top = 0;
  for (const sample of samples) {
    for (const { name } of series) top = Math.max(top, sample.values[name] || 0);
  }
  const { step, top: axisTop } = axis(top);
  top = axisTop;
  const x = (t) => PAD.left + ((t - start) / windowMs) * plotW;
  const y = (v) => PAD.top + plotH - (v / top) * plotH;

  ctx.font = '11px system-ui, sans-serif';
  ctx.lineWidth = 1;
  ctx.strokeStyle = grid;
  ctx.fillStyle = text;
  ctx.textAlign = 'right';
  ctx.textBaseline = 'middle';
  for (let value = 0; value <= top; value += step) {
    const gy = Math.round(y(value)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(PAD.left, gy);
    ctx.lineTo(width - PAD.right, gy);
    ctx.stroke();
    ctx.fillText(String(value), PAD.left - 6, gy);
  }
  ctx.textAlign = 'center';
  ctx.textBaseline = 'top';
  const stepS = windowMs > 180000 ? 60 : windowMs > 60000 ? 30 : 10;
  for (let s = 0; s * 1000 <= windowMs; s += stepS) {
    ctx.fillText(s === 0 ? 'now' : `-${s}s`, x(now - s * 1000), PAD.top + plotH + 6);
  }

  ctx.lineWidth = 2;
  ctx.lineJoin = 'round';
  for (const { name, color } of series) {
    ctx.strokeStyle = color;
    ctx.beginPath();
    let started = false;
    for (const sample of samples) {
      if (sample.t < start) continue;
      const px = x(sample.t);
      const py = y(sample.values[name] || 0);
      if (started) ctx.lineTo(px, py);
      else ctx.moveTo(px, py);
      started = true;
    }
    ctx.stroke();
  }
}
