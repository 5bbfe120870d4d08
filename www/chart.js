// A bar per decoded token (ms), drawn on a canvas as tokens arrive. The prefill (time to first
// token) is much longer than a decode step and is shown apart, in the stats, not as a bar.

export class TokenChart {
  constructor(canvas) {
    this.canvas = canvas;
    this.values = [];
  }

  reset() {
    this.values = [];
    this.draw();
  }

  push(ms) {
    this.values.push(ms);
    this.draw();
  }

  draw() {
    const { canvas, values } = this;
    const ctx = canvas.getContext("2d");
    const w = canvas.width;
    const h = canvas.height;
    ctx.clearRect(0, 0, w, h);
    ctx.fillStyle = "#666";
    ctx.font = "11px system-ui, sans-serif";
    if (values.length === 0) {
      ctx.fillText("decode ms per token appear here", 8, h / 2);
      return;
    }
    const max = Math.max(...values) * 1.1;
    const pad = 28;
    const bar = Math.max(1, Math.min(12, (w - pad) / values.length));
    ctx.fillText(`${max.toFixed(1)} ms`, 2, 10);
    ctx.fillText("0", 2, h - 2);
    ctx.fillStyle = "#3a6ea5";
    values.forEach((v, i) => {
      const bh = (v / max) * (h - 14);
      ctx.fillRect(pad + i * bar, h - bh, Math.max(1, bar - 1), bh);
    });
  }
}
