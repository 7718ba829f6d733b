"""
Evaluation: every model on the test split of every task, greedy by default, batched through rollout.rollout;
accuracy and tool statistics per model, task and level; results.json, trajectories.jsonl (+ images/) and a
self-contained report.html (no network: CSS, JS, SVG plots and images are all inside the page).

    python evaluate.py --models tc=runs/tc/model,tg=runs/tg/model,direct=runs/tc_direct/model:none --out runs/eval

A model is `tiny` (the pretrained base), `scratch`, PATH or LABEL=PATH. A suffix `:all`, `:none` or `:Tool+Tool`
gives that model its own tool mode (a model trained without tools is evaluated with the direct-answer prompt beside
tool models in one run).
"""
import argparse
import base64
import html
import io
import json
import os
import re
import shlex
import sys
import time
from collections import Counter

from PIL import Image

import adl
import tasks
from rollout import (EVAL_BATCH, add_device_flag, add_limit_flags, add_protocol_flag, cli, evaluate, level_key,
                     limits_of, load_policy, mean, metrics, model_exists, parse_flags, protocol_of, resolve_device,
                     write_json_atomic)
from tools import TOOLS, tool_list

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default="tiny", help="comma-separated models: tiny | scratch | PATH | LABEL=PATH, each "
                    "with an optional tool-mode suffix :all | :none | :Tool+Tool (overrides --tools for that model)")
parser.add_argument("--tasks", default=",".join(tasks.TASKS), help="comma-separated tasks (default: all five)")
parser.add_argument("--n", type=int, default=None, help="examples per task (default 20; with --data: at most this "
                    "many per task, default all)")
parser.add_argument("--split", default="test", choices=list(tasks.SPLITS), help="split to generate (default test)")
parser.add_argument("--data", default=None, help="evaluate a saved dataset (tasks.save format: DIR/examples.jsonl) "
                    "instead of generating one; --tasks filters it")
parser.add_argument("--tools", default="all", help="tools offered: all | none (direct-answer prompt) | "
                    "comma-separated canonical names")
parser.add_argument("--add-tools", default="", help="comma-separated tools offered on top of --tools, at inference "
                    "only (the paper's discard experiment, e.g. AStar on vsp_verify)")
parser.add_argument("--adl", default="off", choices=["off", "per-sample", "per-run"], help="randomize tool names, "
                    "parameter names and descriptions: a fresh mapping per example, or one for the whole run")
parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (when temperature > 0)")
parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0 = off (when temperature > 0)")
parser.add_argument("--batch-size", type=int, default=EVAL_BATCH, help="examples per rollout batch")
add_limit_flags(parser)
parser.add_argument("--curves", default="", help="training logs to plot: comma-separated LABEL=path/log.jsonl")
parser.add_argument("--show", type=int, default=20, help="trajectories per model and task in the report")
parser.add_argument("--out", default="runs/eval", help="output directory")
add_device_flag(parser, "the models run")
add_protocol_flag(parser)
parser.add_argument("--seed", type=int, default=0, help="seed of the generated test set, the sampler and ADL")
parser.add_argument("--quick", action="store_true", help="smoke test: 2 examples per task, short turns")
# new defaults under --quick (rollout.parse_flags): explicit flags still win
QUICK = dict(n=2, max_new_tokens=24, max_turns=2, show=2)

# tab10 colours: model i (or curve i) is drawn in PALETTE[i] in every chart and legend
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
# keys read from training logs: rollout.metrics' vocabulary (grpo.py logs it per step) plus reward and loss
CURVE_SCALARS = ["reward", "accuracy", "format_valid_rate", "tool_success_rate", "loss"]

# -----------------------------------------------------------------------------
# models and tool modes


def tool_names(mode, add=()):
    """A tool mode -> canonical tool names offered ([] = the direct-answer prompt), extra tools appended."""
    names = tool_list(mode)
    return names + [t for t in tool_list(",".join(add)) if t not in names]  # --add-tools: after, no duplicates


def is_tool_mode(s):
    # tools join with '+' in a suffix: ',' already separates the models of --models
    return s in ("all", "none") or (bool(s) and all(t in TOOLS for t in s.split("+")))


def parse_models(spec, default_mode):
    """'tc=runs/tc/model,direct=runs/d/model:none' -> [(label, path, tool mode)]."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        label, _, path = item.rpartition("=")  # no '=': an empty label, the whole item is the path
        head, _, mode = path.rpartition(":")  # the text after the last ':'
        # a suffix that is no tool mode stays part of the path
        path, mode = (head, mode) if head and is_tool_mode(mode) else (path, default_mode)
        if not label:  # runs/tc/model is labelled tc
            parts = os.path.normpath(path).split(os.sep)
            label = parts[-2] if len(parts) > 1 and parts[-1] in ("model", "final") else parts[-1]
        out.append((label, path, mode))
    labels = [m[0] for m in out]
    if len(set(labels)) < len(labels):  # labels key results.json and the report
        raise ValueError(f"two models share a label in {labels}; name them LABEL=PATH")
    return out


def fmt(v, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"  # rates in percent, counts such as CPS as they are


def md_table(header, rows):
    """A Markdown table (this file's results and reproduce.py's summary)."""
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                     + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def html_table(header, rows):
    """A plain HTML table, every cell escaped."""
    return ("<table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in header) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows) + "</table>")


def markdown_table(results, task_list):
    """Models as rows, tasks as columns: 'accuracy % / CPS', and the macro mean over tasks."""
    rows = []
    for label, per_task in results.items():
        cells = [f"{fmt(per_task[t]['accuracy'], True)} / {fmt(per_task[t]['cps'])}" for t in task_list]
        # macro means: every task weighs the same, whatever its n
        acc, cps = (mean(per_task[t][k] for t in task_list) for k in ("accuracy", "cps"))
        rows.append([label, *cells, f"{fmt(acc, True)} / {fmt(cps)}"])
    return md_table(["model", *task_list, "mean"], rows) + "\n\ncells: accuracy % / CPS (tool calls per sample)"

# -----------------------------------------------------------------------------
# trajectories on disk


def safe(name):
    return re.sub(r"[^\w.-]", "_", str(name))  # ids and labels become file names


def save_trajectories(out, label, examples, trajectories):
    """-> JSON records (every turn, call, observation, answer, score); images become PNG files under out/images/:
    input images once per example, tool-made images per model."""
    records = []
    for ex, t in zip(examples, trajectories):
        paths = []
        for k, img in enumerate(t.images):
            own = k >= len(ex["images"])  # made by a tool in this model's run, not an input
            rel = os.path.join("images", safe(label), f"{safe(ex['id'])}_{k + 1}.png") if own else \
                os.path.join("images", "input", f"{safe(ex['id'])}_{k + 1}.png")
            # an input is the same for every model: written once, under images/input
            if own or not os.path.exists(os.path.join(out, rel)):
                os.makedirs(os.path.dirname(os.path.join(out, rel)), exist_ok=True)
                tasks.save_png(img, os.path.join(out, rel))
            paths.append(rel)

        def part(p):
            if p.get("type") != "image":
                return p
            # an image part names its image 'img_k': index k - 1 of the trajectory's images
            k = int(str(p["image"]).rpartition("_")[2]) - 1
            return {**p, "path": paths[k] if 0 <= k < len(paths) else None}
        # the messages as the rollout kept them, each image part given the path of its PNG
        messages = [{**m, "content": m["content"] if isinstance(m["content"], str) else [part(p) for p in m["content"]]}
                    for m in t.messages]
        # generated_tokens: the ones of loss_mask, exactly the tokens the model sampled
        records.append({
            "model": label, "task": ex["task"], "example_id": ex["id"], "level": ex.get("meta", {}).get("level"),
            "question": ex["question"], "gold": ex["answer"], "answer": t.answer, "score": tasks.score(ex, t.answer),
            "format_valid": bool(t.format_valid), "finish_reason": t.finish_reason, "turns": len(t.assistant_turns),
            "generated_tokens": sum(t.loss_mask), "calls": t.calls, "messages": messages, "images": paths,
            "adl_mapping": t.adl_mapping})
    return records

# -----------------------------------------------------------------------------
# training curves


def read_curves(spec):
    """'tg=runs/tg/log.jsonl,...' -> {label: [record, ...]}; unreadable lines are skipped, a missing file warns."""
    runs = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        label, _, path = item.rpartition("=")
        # no label: the log's directory names it (runs/tg/log.jsonl -> tg)
        label = label or os.path.basename(os.path.dirname(os.path.abspath(path)))
        if not os.path.isfile(path):
            print(f"warning: --curves {path} does not exist; skipped", file=sys.stderr)
            continue
        recs = []
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # e.g. a last line cut short by an interrupted run
                if isinstance(rec, dict):
                    recs.append(rec)
        runs[label] = recs
    return runs


def number(v):
    # v == v fails only for NaN; a bool is not a value to plot
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v


def curve_charts(runs):
    """-> [(title, {line name: [(step, value)]})]: one chart per scalar (runs as lines), then per run one chart
    of calls per sample per tool (tools as lines)."""
    charts = []
    for key in CURVE_SCALARS:
        lines = {}
        for label, recs in runs.items():
            # x: the record's step, or its position in the log when it has none
            pts = [(r.get("step", i), r[key]) for i, r in enumerate(recs)
                   if number(r.get(key)) and number(r.get("step", i))]
            if pts:
                lines[label] = pts
        if lines:
            charts.append((key, lines))
    for label, recs in runs.items():
        steps = []  # (step, {tool: value}) of the records that report tool use
        for i, r in enumerate(recs):
            per_tool = r.get("calls_per_sample_per_tool")
            if isinstance(per_tool, dict) and number(r.get("step", i)):
                steps.append((r.get("step", i), {str(k): v for k, v in per_tool.items() if number(v)}))
        # a log lists only the tools called at a step: a tool seen at some step was called 0 times at the others
        seen = {k for _, d in steps for k in d}
        tools = [k for k in TOOLS if k in seen] + sorted(seen - set(TOOLS))
        lines = {k: [(step, d.get(k, 0)) for step, d in steps] for k in tools}
        if lines:
            charts.append((f"calls per sample per tool: {label}", lines))
    return charts

# -----------------------------------------------------------------------------
# inline SVG


def esc(s):
    return html.escape(str(s), quote=True)


def nice(v):
    return f"{v:.3g}"


def svg_lines(title, lines, width=420, height=240):
    """A line chart with min/max axis labels and a legend; x and y scaled to the data."""
    left, right, top, bottom = 48, 12, 28, 56  # margins in px: y labels on the left, the legend below
    xs = [x for pts in lines.values() for x, _ in pts]
    ys = [y for pts in lines.values() for _, y in pts]
    # a single step or a flat line still gets a non-zero range: sx and sy divide by it
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys + [0]), max(ys)  # the y axis starts at 0 unless a value lies below it
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x):  # data to pixel coordinates
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):  # SVG's y grows downwards: flip
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="{left}" y="16" class="title">{esc(title)}</text>',
           f'<line x1="{left}" y1="{sy(y0)}" x2="{width - right}" y2="{sy(y0)}" class="axis"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"/>']
    for y in (y0, (y0 + y1) / 2, y1):  # three grid lines with their labels: bottom, middle, top
        out.append(f'<line x1="{left}" y1="{sy(y):.1f}" x2="{width - right}" y2="{sy(y):.1f}" class="grid"/>'
                   f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{nice(y)}</text>')
    out.append(f'<text x="{left}" y="{height - bottom + 14}" text-anchor="middle">{nice(x0)}</text>'
               f'<text x="{width - right}" y="{height - bottom + 14}" text-anchor="end">{nice(x1)}</text>'
               f'<text x="{(left + width - right) / 2}" y="{height - bottom + 14}" text-anchor="middle">step</text>')
    for i, (name, pts) in enumerate(lines.items()):
        colour = PALETTE[i % len(PALETTE)]
        pts = sorted(pts)  # by step, whatever order the log holds them in
        d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{d}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        if len(pts) == 1:  # a polyline of one point draws nothing
            out.append(f'<circle cx="{sx(pts[0][0]):.1f}" cy="{sy(pts[0][1]):.1f}" r="3" fill="{colour}"/>')
        lx, ly = left + (i % 3) * 120, height - 26 + (i // 3) * 13  # legend: 3 entries a row, 120 px apart
        out.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="8" fill="{colour}"/>'
                   f'<text x="{lx + 14}" y="{ly}">{esc(name)[:18]}</text>')
    return "\n".join(out) + "</svg>"


def svg_bars(title, groups, series, values, width=440):
    """Horizontal grouped bars: one group per tool, one bar per model; values[(group, series)]."""
    bar, gap, left, top = 11, 8, 110, 26  # px: one bar per model, a gap after each tool, room for tool names
    vmax = max([values.get((g, s), 0) for g in groups for s in series] + [1e-9])  # all zeros: no division by 0
    height = top + len(groups) * (len(series) * bar + gap) + 8
    scale = (width - left - 52) / vmax  # px per call per sample; 52 px stay free for the longest bar's label
    out = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
           f'<text x="4" y="16" class="title">{esc(title)}</text>']
    y = top
    for g in groups:
        out.append(f'<text x="{left - 6}" y="{y + len(series) * bar / 2 + 4}" text-anchor="end">{esc(g)}</text>')
        for i, s in enumerate(series):
            v = values.get((g, s), 0)
            # a zero still shows as a 0.5-px sliver; the <title> is the hover text
            out.append(f'<rect x="{left}" y="{y}" width="{max(v * scale, 0.5):.1f}" height="{bar - 2}" '
                       f'fill="{PALETTE[i % len(PALETTE)]}"><title>{esc(s)}: {v:.2f}</title></rect>'
                       f'<text x="{left + v * scale + 4:.1f}" y="{y + bar - 3}">{v:.2f}</text>')
            y += bar
        y += gap
    return "\n".join(out) + "</svg>"

# -----------------------------------------------------------------------------
# the report


def data_uri(path, max_side=512):
    """A JPEG thumbnail as a data: URI (the full PNG stays next to trajectories.jsonl)."""
    with Image.open(path) as im:
        im = im.convert("RGB")  # JPEG has no alpha or palette
        im.thumbnail((max_side, max_side), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=82)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def page_data(out, records, show):
    """Trajectories (the first `show` per model and task) and their images for the page's browser."""
    kept, seen, images = [], Counter(), {}
    for r in records:
        seen[r["model"], r["task"]] += 1
        if seen[r["model"], r["task"]] > show:  # the page holds at most `show` per model and task
            continue
        messages = []
        for m in r["messages"]:
            # a plain-string content becomes one text part: the page's script reads a single shape
            content = [{"type": "text", "text": m["content"]}] if isinstance(m["content"], str) else m["content"]
            parts = []
            for p in content:
                if p.get("type") == "image":
                    # each image once per page, however many trajectories show it (every model shares the inputs)
                    if p.get("path") and p["path"] not in images and os.path.isfile(os.path.join(out, p["path"])):
                        images[p["path"]] = data_uri(os.path.join(out, p["path"]))
                    parts.append({"image": p.get("path"), "name": p.get("image")})
                else:
                    parts.append({"text": p.get("text", "")})
            messages.append({"role": m["role"], "parts": parts})
        # the fields the page's script (JS: card, body) reads
        kept.append({"model": r["model"], "task": r["task"], "id": r["example_id"], "level": r["level"],
                     "correct": r["score"] >= 1.0, "answer": r["answer"], "gold": r["gold"],
                     "finish": r["finish_reason"],
                     "calls": [f"{c['name']}: {c['status']}" for c in r["calls"]], "messages": messages})
    return kept, images


def script_json(obj):
    # "<" escaped so that no text inside can close the <script> element
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c")


# the look of svg_lines / svg_bars charts, shared with reproduce.py's report
CHART_CSS = (".chart text{font-size:11px;fill:#333}.chart .title{font-size:13px;font-weight:600}"
             ".chart .axis{stroke:#888}.chart .grid{stroke:#eee}")
CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1240px;
padding:16px 24px;color:#222}

h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:14px 0 6px}.meta{color:#555;font-size:12px}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
table{border-collapse:collapse;margin:6px 0 12px}th,td{border:1px solid #d8d8d8;padding:4px 8px;text-align:right}
th:first-child,td:first-child,.l{text-align:left}th{background:#f5f5f5}
td.cell b{font-size:15px}td.cell span{color:#555;font-size:12px;margin-left:4px}
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{background:#fcfcfc;border:1px solid #e5e5e5;border-radius:4px}
""" + CHART_CSS + """
.legend span{display:inline-block;margin-right:14px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-1px}
.filters{position:sticky;top:0;background:#fff;padding:8px 0;border-bottom:1px solid #eee;z-index:1}
.filters select{margin-right:12px}
details.card{border:1px solid #ddd;border-radius:4px;margin:6px 0;background:#fff}
details.card>summary{cursor:pointer;padding:6px 10px;background:#fafafa}
.ok,.bad{display:inline-block;width:18px;text-align:center;border-radius:3px;color:#fff;margin-right:6px;
font-weight:700}

.ok{background:#2e9d4d}.bad{background:#c9362f}
.msg{margin:6px 10px;padding:6px 8px;border-left:4px solid #ccc}.msg .role{font-weight:600;font-size:12px;color:#555}
.msg.assistant{border-color:#1f77b4;background:#f4f8fc}.msg.user{border-color:#999}.msg.system{border-color:#ddd}
.msg pre{white-space:pre-wrap;word-break:break-word;margin:2px 0;font:12px/1.4 ui-monospace,Menlo,Consolas,monospace}
figure{display:inline-block;margin:4px 8px 4px 0}
figure img{max-width:256px;max-height:256px;border:1px solid #ccc;display:block;cursor:zoom-in}
figure img.big{max-width:none;max-height:none;cursor:zoom-out}
figcaption{font-size:11px;color:#555}
"""

JS = """
const T = JSON.parse(document.getElementById('trajs').textContent);
const I = JSON.parse(document.getElementById('imgs').textContent);
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text; return e; }
function body(r, d) {
  r.messages.forEach((m, i) => {
    const box = el('div', 'msg ' + m.role);
    box.appendChild(el('div', 'role', m.role === 'user' && i > 1 ? 'tool observation (user)' : m.role));
    let target = box;
    if (m.role === 'system') { const s = el('details'); s.appendChild(el('summary', null, 'system prompt'));
      box.appendChild(s); target = s; }
    for (const p of m.parts) {
      if (p.text !== undefined) { target.appendChild(el('pre', null, p.text)); continue; }
      const f = el('figure');
      if (p.image && I[p.image]) { const img = el('img'); img.src = I[p.image]; img.alt = p.name;
        img.onclick = () => img.classList.toggle('big'); f.appendChild(img); }
      f.appendChild(el('figcaption', null, p.name));
      target.appendChild(f);
    }
    d.appendChild(box);
  });
}
function card(r, open) {
  const d = el('details', 'card');
  const s = el('summary');
  s.appendChild(el('span', r.correct ? 'ok' : 'bad', r.correct ? '\\u2713' : '\\u2717'));
  s.appendChild(document.createTextNode(
    `${r.model} \\u00b7 ${r.task} \\u00b7 ${r.id} \\u00b7 level ${r.level} \\u00b7 ` +
    `answer ${r.answer === null ? '(none)' : JSON.stringify(r.answer)} (gold ${JSON.stringify(r.gold)}) \\u00b7 ` +
    `${r.calls.length} call${r.calls.length === 1 ? '' : 's'}` +
    `${r.calls.length ? ' [' + r.calls.join(', ') + ']' : ''} \\u00b7 ${r.finish}`));
  d.appendChild(s);
  let built = false;
  d.addEventListener('toggle', () => { if (d.open && !built) { built = true; body(r, d); } });
  if (open) d.open = true;
  return d;
}
function render() {
  const task = document.getElementById('f-task').value, model = document.getElementById('f-model').value,
        outcome = document.getElementById('f-outcome').value, list = document.getElementById('list');
  list.replaceChildren();
  let shown = 0;
  for (const r of T) {
    if ((task && r.task !== task) || (model && r.model !== model) ||
        (outcome === 'correct' && !r.correct) || (outcome === 'wrong' && r.correct)) continue;
    list.appendChild(card(r, shown === 0));
    shown += 1;
  }
  document.getElementById('count').textContent = `${shown} of ${T.length} trajectories`;
}
function options(id, values) { const s = document.getElementById(id);
  for (const v of values) { const o = el('option', null, v); o.value = v; s.appendChild(o); } s.onchange = render; }
options('f-task', [...new Set(T.map(r => r.task))]);
options('f-model', [...new Set(T.map(r => r.model))]);
document.getElementById('f-outcome').onchange = render;
// filters can be preset in the address: report.html#task=jigsaw&model=tg&outcome=wrong
for (const [k, v] of new URLSearchParams(location.hash.slice(1))) {
  const s = document.getElementById('f-' + k); if (s) s.value = v; }
render();
"""


def heat(acc):
    # hue 0 (red) at 0% to 120 (green) at 100%, a little darker as accuracy grows
    return "" if acc is None else f' style="background:hsl({int(120 * acc)},55%,{92 - 10 * acc:.0f}%)"'


def report_html(out, results, records, curves, show=20):
    """The self-contained page: tables, inline-SVG plots, and the trajectory browser."""
    labels = list(results["results"])
    task_list = results["tasks"]
    R = results["results"]  # R[model][task]: rollout.metrics of that pair
    # model i in PALETTE[i], the colour of its bars in svg_bars
    legend = '<p class="legend">' + "".join(f'<span><i style="background:{PALETTE[i % len(PALETTE)]}"></i>'
                                            f'{esc(m)}</span>' for i, m in enumerate(labels)) + "</p>"
    h = [f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>AdaReasoner evaluation</title>"
         f"<style>{CSS}</style></head><body>",
         "<h1>AdaReasoner evaluation</h1>",
         f'<p class="meta"><code>{esc(results["command"])}</code><br>{esc(results["date"])}'
         f' · device {esc(results["device"])}'
         f' · split {esc(results["settings"]["split"])} · tools {esc(results["settings"]["tools"])}'
         + (f' + {esc(results["settings"]["add_tools"])}' if results["settings"]["add_tools"] else "")
         + f' · ADL {esc(results["settings"]["adl"])} · temperature {results["settings"]["temperature"]}'
         f' · seed {results["settings"]["seed"]}</p>']

    # the ablation table
    h.append("<h2>Ablation table</h2><p class=\"meta\">accuracy % (CPS = tool calls per sample); mean = macro "
             "average over tasks</p><table><tr><th>model</th><th class=\"l\">tools</th>"
             + "".join(f"<th>{esc(t)}</th>" for t in task_list) + "<th>mean</th></tr>")
    for m in labels:
        cells = [(R[m][t]["accuracy"], R[m][t]["cps"]) for t in task_list]
        cells.append((mean(a for a, _ in cells), mean(c for _, c in cells)))  # the 'mean' column: macro means
        h.append(f"<tr><td>{esc(m)}</td><td class=\"l\">{esc(results['models'][m]['tool_mode'])}</td>" + "".join(
            f'<td class="cell"{heat(a)}><b>{fmt(a, True)}</b><span>({fmt(c)})</span></td>' for a, c in cells) + "</tr>")
    h.append("</table>")

    # details per model and task
    h.append("<h2>Details</h2><table><tr><th>model</th><th class=\"l\">task</th><th>n</th><th>accuracy %</th>"
             "<th>CPS</th><th>tool success %</th><th>turns</th><th>gen. tokens</th><th>format valid %</th>"
             "<th>answered %</th><th class=\"l\">finish reasons</th><th>samples/s</th></tr>")
    for m in labels:
        for t in task_list:
            r = R[m][t]
            reasons = ", ".join(f"{k} {v}" for k, v in r["finish_reasons"].items())
            h.append(f"<tr><td>{esc(m)}</td><td class=\"l\">{esc(t)}</td><td>{r['n']}</td>"
                     f"<td>{fmt(r['accuracy'], True)}</td><td>{fmt(r['cps'])}</td>"
                     f"<td>{fmt(r['tool_success_rate'], True)}</td><td>{fmt(r['mean_turns'])}</td>"
                     f"<td>{fmt(r['mean_generated_tokens'])}</td><td>{fmt(r['format_valid_rate'], True)}</td>"
                     f"<td>{fmt(r['answered_rate'], True)}</td><td class=\"l\">{esc(reasons)}</td>"
                     f"<td>{fmt(results['models'][m].get('samples_per_s'))}</td></tr>")
    h.append("</table>")

    # per level
    h.append("<h2>Accuracy by level</h2><p class=\"meta\">vsp_*: grid size, jigsaw: candidates, vstar: question kind, "
             "guiqa: fields on the screen; accuracy % (n)</p>")
    for t in task_list:
        # by_level keys are strings in JSON: numeric levels sort as numbers (3 < 10), then the named ones
        levels = sorted({lv for m in labels for lv in R[m][t].get("by_level", {})},
                        key=lambda s: level_key(int(s) if s.lstrip("-").isdigit() else s))
        if not levels:
            continue
        h.append(f"<h3>{esc(t)}</h3><table><tr><th>model</th>" + "".join(f"<th>{esc(lv)}</th>" for lv in levels)
                 + "</tr>")
        for m in labels:
            bl = R[m][t].get("by_level", {})
            h.append(f"<tr><td>{esc(m)}</td>" + "".join(
                f'<td{heat(bl[lv]["accuracy"])}>{fmt(bl[lv]["accuracy"], True)} ({bl[lv]["n"]})</td>' if lv in bl
                else "<td></td>" for lv in levels) + "</tr>")
        h.append("</table>")

    # tool call frequency
    h.append("<h2>Tool calls per sample</h2>" + legend + '<div class="charts">')
    for t in task_list:
        # the tools any model called here, in registry order, then names outside TOOLS (calls to tools that
        # do not exist still count)
        used = {k for m in labels for k in R[m][t]["calls_per_sample_per_tool"]}
        groups = [k for k in TOOLS if k in used] + sorted(used - set(TOOLS))
        if not groups:
            h.append(f'<svg class="chart" width="440" height="50"><text x="4" y="16" class="title">{esc(t)}</text>'
                     '<text x="4" y="38">no tool calls</text></svg>')
            continue
        values = {(g, m): R[m][t]["calls_per_sample_per_tool"].get(g, 0) for g in groups for m in labels}
        h.append(svg_bars(t, groups, labels, values))
    h.append("</div>")

    # training curves
    if curves:
        charts = curve_charts(curves)
        h.append("<h2>Training curves</h2>"
                 + ('<div class="charts">' + "".join(svg_lines(*c) for c in charts) + "</div>"
                    if charts else "<p>the logs hold no plottable values</p>"))

    # trajectories
    kept, images = page_data(out, records, show)  # thumbnails as data: URIs, no files beside the page
    h.append(f"<h2>Trajectories</h2><p class=\"meta\">the first {show} per model and task (click an image to enlarge "
             "it); all of them with full-size images are in trajectories.jsonl and images/</p>"
             '<div class="filters">task <select id="f-task"><option value="">all</option></select>'
             'model <select id="f-model"><option value="">all</option></select>'
             'outcome <select id="f-outcome"><option value="">all</option><option value="correct">correct</option>'
             '<option value="wrong">wrong</option></select><span id="count" class="meta"></span></div>'
             '<div id="list"></div>')
    # the data as JSON script elements that JS parses; script_json keeps any text from closing them
    h.append(f'<script type="application/json" id="trajs">{script_json(kept)}</script>'
             f'<script type="application/json" id="imgs">{script_json(images)}</script><script>{JS}</script>')
    h.append("</body></html>")
    return "\n".join(h)

# -----------------------------------------------------------------------------
# the run


def write_outputs(out, settings, runs, curves=None):
    """runs: {label: {"path", "tool_mode", "tools", "examples", "trajectories", "seconds"}} -> results dict; writes
    results.json, trajectories.jsonl, images/ and report.html under `out`."""
    os.makedirs(out, exist_ok=True)
    # the tasks present, in the canonical TASKS order whatever the examples' order
    task_list = [t for t in tasks.TASKS if any(ex["task"] == t for r in runs.values() for ex in r["examples"])]
    results = {"command": settings.get("command", ""), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "device": settings.get("device", ""), "settings": settings, "tasks": task_list,
               # the sampler: each row its own stream, keyed by the seed, the example's position and the sample
               "seeds": {"data": None if settings.get("data") else settings.get("seed"),
                         "rollout": settings.get("seed"), "adl": settings.get("seed")},
               "models": {}, "results": {}}
    records = []
    for label, run in runs.items():
        exs, trajs = run["examples"], run["trajectories"]
        n = len(exs)
        results["models"][label] = {"path": run["path"], "tool_mode": run["tool_mode"], "tools": run["tools"],
                                    "protocol": run.get("protocol", "ours"), "seconds": run.get("seconds"),
                                    "samples": n,
                                    "samples_per_s": n / run["seconds"] if run.get("seconds") else None}
        results["results"][label] = {}
        for t in task_list:
            # metrics per task over aligned lists: trajs[i] answers exs[i]
            idx = [i for i, ex in enumerate(exs) if ex["task"] == t]
            results["results"][label][t] = metrics([exs[i] for i in idx], [trajs[i] for i in idx])
        records += save_trajectories(out, label, exs, trajs)
    write_json_atomic(os.path.join(out, "results.json"), results, indent=1)
    with open(os.path.join(out, "trajectories.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    with open(os.path.join(out, "report.html"), "w", encoding="utf-8") as f:
        f.write(report_html(out, results, records, curves or {}, settings.get("show", 20)))
    return results


def load_examples(task_list, n, data, split, seed):
    """The test examples of task_list, the same for every model: from the file `data` when given (the first n of
    each task, in file order; all of them when n is None), else generated (n per task, 20 when None)."""
    if data:
        per_task, examples = Counter(), []
        for ex in tasks.load(data):
            if ex["task"] in task_list and (n is None or per_task[ex["task"]] < n):
                per_task[ex["task"]] += 1
                examples.append(ex)
        return examples
    return [ex for t in task_list for ex in tasks.generate(t, n or 20, split=split, seed=seed)]


def main(argv=None):
    args = parse_flags(parser, argv, QUICK)
    task_list = [t for t in args.tasks.split(",") if t]
    bad = [t for t in task_list if t not in tasks.TASKS]
    if bad:
        parser.error(f"unknown tasks {bad}; tasks are {list(tasks.TASKS)}")
    add = [t for t in args.add_tools.split(",") if t]
    try:
        models = parse_models(args.models, args.tools)
        # each distinct mode resolved once; an unknown tool fails here
        modes = {mode: tool_names(mode, add) for _, _, mode in models}
    except ValueError as e:
        parser.error(str(e))
    missing = [p for _, p, _ in models if not model_exists(p)]
    if missing:  # before any model runs, not after an hour of the first one
        parser.error(f"model directories not found: {missing}")
    device = resolve_device(args.device)
    # the command line that reruns this evaluation, for results.json and the report
    command = "python " + " ".join(shlex.quote(a) for a in ([os.path.basename(sys.argv[0]) or "evaluate.py"] +
                                                            (sys.argv[1:] if argv is None else list(argv))))
    settings = {**vars(args), "command": command, "device": device, "tasks": task_list}
    examples = load_examples(task_list, args.n, args.data, args.split, args.seed)
    if not examples:
        parser.error("no examples to evaluate (check --tasks, --n and --data)")
    os.makedirs(args.out, exist_ok=True)
    # flushed model by model: after an interruption this log still holds the models already done
    log = open(os.path.join(args.out, "log.jsonl"), "w", encoding="utf-8")
    runs = {}
    for label, path, mode in models:
        # one model in memory at a time: loaded here, deleted at the end of its turn
        model, processor = load_policy(path, device=device)
        offered, protocol = modes[mode], protocol_of(args.protocol, path)
        if protocol.name != "ours" and args.adl != "off":
            parser.error("--adl rewrites this project's protocol only; it does not combine with --protocol official")
        # ADL mappings seeded by --seed (per sample, and the example id): the same tools offered, the same names
        plan = adl.plan(examples, protocol.schemas(offered), args.adl, args.seed)
        t0 = time.perf_counter()
        trajs, per_task = evaluate(model, processor, examples, offered, plan, args.batch_size, f"eval {label}",
                                   args.seed, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                   protocol=protocol, **limits_of(args))
        seconds = time.perf_counter() - t0
        runs[label] = {"path": path, "tool_mode": mode, "tools": offered, "protocol": protocol.name,
                       "examples": examples,
                       "trajectories": trajs, "seconds": seconds}
        for t, m in per_task.items():
            log.write(json.dumps({"model": label, "task": t, **m}) + "\n")
        log.write(json.dumps({"model": label, "samples": len(examples), "seconds": seconds,
                              "samples_per_s": len(examples) / seconds}) + "\n")
        log.flush()
        del model, processor  # free the memory before the next model loads
    log.close()
    results = write_outputs(args.out, settings, runs, read_curves(args.curves))
    print(markdown_table(results["results"], results["tasks"]))
    for label, m in results["models"].items():
        print(f"{label}: {m['samples']} samples in {m['seconds']:.1f} s = {m['samples_per_s']:.2f} samples/s "
              f"(tools: {m['tool_mode']})")
    print(f"wrote {args.out}/results.json, trajectories.jsonl, report.html")
    return results


if __name__ == "__main__":
    cli(main)
