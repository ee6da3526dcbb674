"""The browser's two pages: the latent index and the latent viewer (inline CSS and script).

Both read their data from ``data/*.js`` files next to them through ``<script src>`` tags, which
browsers allow for ``file://`` pages (``fetch`` is not), so the browser needs no server. The
viewer loads only the data file of the latent's group, so a dictionary of 65,536 latents opens
as fast as one of 64.
"""

from __future__ import annotations

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 20px; color: #222; background: #fff; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 22px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
th a { color: #222; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.flag-dead { color: #999; } .flag-dense { color: #b35900; font-weight: 600; }
.nav a, .nav span { margin-right: 10px; } .note { color: #666; }
.ctx { font-family: ui-monospace, monospace; white-space: pre-wrap; margin: 3px 0;
       padding: 2px 4px; border-left: 3px solid #eee; }
.tok { border-radius: 2px; } .tok.peak { outline: 1px solid #c00; }
.cols { display: flex; flex-wrap: wrap; gap: 24px; } .cols > div { min-width: 220px; }
img.field { image-rendering: pixelated; border: 1px solid #ddd; margin: 2px; }
"""

INDEX_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__: latents</title>
<style>__CSS__</style></head><body>
<h1>__TITLE__</h1><p class="note" id="summary"></p>
<div class="nav" id="nav"></div>
<table id="latents"><thead><tr>
<th><a href="?sort=id">latent</a></th><th><a href="?sort=density">density</a></th>
<th><a href="?sort=max">max activation</a></th><th><a href="?sort=mean">mean</a></th>
<th>flag</th><th>top tokens</th></tr></thead><tbody id="rows"></tbody></table>
<script src="data/index.js"></script>
<script>
(function () {
  const data = window.INSPECT_INDEX, per = __PER_PAGE__;
  const q = new URLSearchParams(location.search);
  const key = q.get("sort") || "max";
  const col = {id: 0, density: 1, max: 2, mean: 3}[key] ?? 2;
  const rows = data.rows.slice();
  if (col === 0) rows.sort((a, b) => a[0] - b[0]);
  else rows.sort((a, b) => b[col] - a[col] || a[0] - b[0]);
  const pages = Math.max(1, Math.ceil(rows.length / per));
  const page = Math.min(Math.max(parseInt(q.get("page") || "1", 10) || 1, 1), pages);
  const fmt = (v) => v === 0 ? "0" : Math.abs(v) < 1e-3 ? v.toExponential(2) : v.toPrecision(4);
  const esc = (s) => s.replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;"}[c]));
  document.getElementById("summary").textContent = data.summary;
  const body = [];
  for (const r of rows.slice((page - 1) * per, page * per)) {
    body.push(`<tr class="latent" data-id="${r[0]}" data-density="${r[1]}" data-max="${r[2]}">` +
      `<td><a href="latent.html?id=${r[0]}">${r[0]}</a></td><td class="num">${fmt(r[1])}</td>` +
      `<td class="num">${fmt(r[2])}</td><td class="num">${fmt(r[3])}</td>` +
      `<td class="flag-${r[4]}">${r[4]}</td><td>${esc(r[5])}</td></tr>`);
  }
  document.getElementById("rows").innerHTML = body.join("");
  const link = (p, text) => `<a href="?sort=${key}&page=${p}">${text}</a>`;
  document.getElementById("nav").innerHTML = (page > 1 ? link(page - 1, "&larr; previous") : "") +
    `<span>page ${page} of ${pages}, sorted by ${key}</span>` +
    (page < pages ? link(page + 1, "next &rarr;") : "");
})();
</script></body></html>
"""

LATENT_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__: latent</title>
<style>__CSS__</style></head><body>
<p class="nav"><a href="index.html">all latents</a> <span id="steps"></span></p>
<div id="latent"><p class="note">no latent selected: open latent.html?id=N</p></div>
<script>
window.INSPECT_GROUPS = {};
function inspectGroup(first, latents) { window.INSPECT_GROUPS[first] = latents; }
(function () {
  const id = parseInt(new URLSearchParams(location.search).get("id"), 10);
  if (!(id >= 0)) return;
  const first = id - id % __GROUP__, name = String(first / __GROUP__).padStart(5, "0");
  document.write(`<script src="data/latents_${name}.js"><\\/script>`);
})();
</script>
<script>
(function () {
  const id = parseInt(new URLSearchParams(location.search).get("id"), 10);
  if (!(id >= 0)) return;
  const group = window.INSPECT_GROUPS[id - id % __GROUP__];
  const el = document.getElementById("latent");
  if (!group || !group[id % __GROUP__]) { el.innerHTML = `<p>latent ${id} not found</p>`; return; }
  const L = group[id % __GROUP__], parts = [];
  const fmt = (v) => v === 0 ? "0" : Math.abs(v) < 1e-3 ? v.toExponential(2) : v.toPrecision(4);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;",
    ">": "&gt;", '"': "&quot;"}[c]));
  const near = (j) => `<a href="latent.html?id=${j}">${j}</a>`;
  document.getElementById("steps").innerHTML = (id > 0 ? near(id - 1).replace(">" + (id - 1),
    ">&larr; " + (id - 1)) : "") + " " + near(id + 1).replace(">" + (id + 1), ">" + (id + 1) +
    " &rarr;");
  const flag = L.flag ? ` <span class="flag-${L.flag}">(${L.flag})</span>` : "";
  parts.push(`<h1>latent ${id}${flag}</h1>`);
  parts.push(`<p>density <b>${fmt(L.density)}</b> &middot; max <b>${fmt(L.max)}</b> &middot; ` +
    `mean <b>${fmt(L.mean)}</b> &middot; mean when active <b>${fmt(L.mean_active)}</b></p>`);
  const lists = [];
  if (L.hist.length) {
    const top = Math.max(...L.hist.map((h) => h[2])), h = 90;
    const bw = Math.min(240 / L.hist.length, 24), w = bw * L.hist.length;
    const bars = L.hist.map((b, i) => `<rect class="bar" x="${(i * bw).toFixed(1)}" ` +
      `y="${(h - h * b[2] / top).toFixed(1)}" width="${Math.max(bw - 1, 1).toFixed(1)}" ` +
      `height="${(h * b[2] / top).toFixed(1)}" fill="#1f77b4"><title>[${fmt(b[0])}, ` +
      `${fmt(b[1])}): ${b[2]}</title></rect>`).join("");
    lists.push(`<div><h2>activation histogram</h2><svg class="hist" width="${w}" ` +
      `height="${h}">${bars}</svg><p class="note">log-spaced bins, ${fmt(L.hist[0][0])} to ` +
      `${fmt(L.hist[L.hist.length - 1][1])}</p></div>`);
  }
  const table = (title, items, show) => items && items.length ? `<div><h2>${title}</h2>` +
    `<table>${items.map(show).join("")}</table></div>` : "";
  lists.push(table("promoted tokens", L.up, (t) => `<tr><td>${esc(t[0])}</td>` +
    `<td class="num">${fmt(t[1])}</td></tr>`));
  lists.push(table("suppressed tokens", L.down, (t) => `<tr><td>${esc(t[0])}</td>` +
    `<td class="num">${fmt(t[1])}</td></tr>`));
  lists.push(table("nearest atoms (cosine)", L.near, (t) => `<tr><td>${near(t[0])}</td>` +
    `<td class="num">${fmt(t[1])}</td></tr>`));
  parts.push(`<div class="cols">${lists.join("")}</div>`);
  if (L.images && L.images.length) {
    parts.push(`<h2>${esc(L.images_title)}</h2>` + L.images.map((src) =>
      `<img class="field" src="${src}" alt="field">`).join(""));
  }
  if (L.contexts) {
    parts.push(`<h2>top contexts (${L.contexts.length})</h2>`);
    for (const c of L.contexts) {
      const spans = c.tokens.map((t, i) => t === null ? "" : `<span class="tok${i === c.peak ?
        " peak" : ""}" data-act="${c.acts[i]}" title="${fmt(c.acts[i])}" ` +
        `style="background: rgba(255, 90, 0, ${Math.max(0, c.acts[i] / L.max).toFixed(3)})">` +
        `${esc(t)}</span>`).join("");
      parts.push(`<div class="ctx" data-max="${c.max}">${spans}</div>`);
    }
  }
  el.innerHTML = parts.join("");
  document.title = `latent ${id}`;
})();
</script></body></html>
"""


def page(template: str, **values: object) -> str:
    """``template`` with ``__NAME__`` placeholders filled (``CSS`` filled by default)."""
    out = template.replace("__CSS__", CSS)
    for name, value in values.items():
        out = out.replace(f"__{name.upper()}__", str(value))
    return out
