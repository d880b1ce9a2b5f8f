// diffusekit app: the page's behaviour, vanilla JavaScript, talking only to this server.
// Every action posts JSON to /api/<action>, which starts a job; the page polls /api/job/<id> until it ends.
"use strict";

// the masks drawn per input from --mask-seed (runs/restore.py make_masks): no single preview
const PER_INPUT_MASKS = ["random", "freeform", "box", "uncrop"];

const $ = (selector, root = document) => root.querySelector(selector);
const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));
let RUN = null; // what /api/run says about the run

// -- talking to the server ---------------------------------------------------------------------------
async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body),
  };
  const response = await fetch(path, init);
  let data;
  try {
    data = await response.json();
  } catch (e) {
    data = {error: `${response.status} ${response.statusText}`};
  }
  if (!response.ok) throw new Error(data.error || `${response.status} ${response.statusText}`);
  return data;
}

function status(text, kind) {
  const el = $("#status");
  el.textContent = text;
  el.className = kind || "";
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Start ``action`` and poll its job until it ends: its result, or its one-line error thrown.
async function runJob(action, body) {
  const {job} = await api(`/api/${action}`, body);
  for (;;) {
    const state = await api(`/api/job/${job}`);
    if (state.state === "done") {
      status(`${action}: done in ${state.seconds.toFixed(1)} s`, "ok");
      return {job, result: state.result};
    }
    if (state.state === "error") throw new Error(state.error);
    status(`${action}: running… ${state.seconds.toFixed(1)} s`, "busy");
    await sleep(250);
  }
}

// Run ``task`` with the page marked busy and its buttons disabled; errors become the status line.
async function busy(task) {
  document.body.dataset.state = "busy";
  status("working…", "busy"); // an earlier error no longer applies
  $$("button.go").forEach((b) => { b.disabled = true; });
  try {
    await task();
  } catch (e) {
    status(e.message, "error");
  } finally {
    $$("button.go").forEach((b) => { b.disabled = false; });
    document.body.dataset.state = "idle";
  }
}

// -- form values -------------------------------------------------------------------------------------
function field(form, name) {
  return form.elements.namedItem(name);
}

function numberOrNull(el) {
  return el && el.value !== "" ? Number(el.value) : null;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve({name: file.name, data: reader.result});
    reader.onerror = () => reject(new Error(`${file.name}: cannot read the file`));
    reader.readAsDataURL(file);
  });
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the image cannot be shown (not an image the browser can read)"));
    img.src = src;
  });
}

function visible(el) {
  return !el.closest("[hidden]");
}

function showSections() {
  $$("[data-section]").forEach((el) => { el.hidden = !RUN.sections[el.dataset.section]; });
}

function fillSelect(select, values, selected) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, String(v) === String(selected))));
}

// -- sample ------------------------------------------------------------------------------------------
const SAMPLER_FIELDS = ["sampler", "steps", "eta", "variance", "spacing", "clip_x0", "grid", "snr", "corrector_steps",
  "langevin_steps", "step_size", "rtol", "atol", "order", "guidance"];

function showSamplerFields() {
  const sampler = field($("#sample-form"), "sampler").value;
  $$("#sample-form [data-samplers]").forEach((el) => {
    el.hidden = !el.dataset.samplers.split(" ").includes(sampler);
  });
}

// The sampler settings the user changed from the run's [sample] (sampler and steps always): the overrides
// `diffusekit sample` would get as flags.
function samplerOverrides(form) {
  const out = {};
  const defaults = RUN.defaults.sample;
  for (const name of SAMPLER_FIELDS) {
    const el = field(form, name);
    if (!el || !visible(el) || el.value === "") continue;
    const value = el.type === "number" || name === "order" ? Number(el.value) : el.value;
    if (name === "sampler" || name === "steps" || value !== defaults[name]) out[name] = value;
  }
  return out;
}

async function sampleBody() {
  const form = $("#sample-form");
  const body = {seeds: field(form, "seeds").value.trim(), ema: field(form, "ema").checked,
    save: field(form, "save").checked};
  if (RUN.sections.sampler) Object.assign(body, samplerOverrides(form));
  if (RUN.sections.classes && field(form, "classes").value.trim()) body.classes = field(form, "classes").value.trim();
  if (RUN.sections.prompts) {
    const lines = field(form, "prompts").value.split("\n").map((p) => p.trim()).filter(Boolean);
    body.prompts = lines.length ? lines : [""]; // "" samples unconditionally
  }
  if (RUN.sections.control) {
    const source = field(form, "control_source").value;
    body.control = {source, scale: numberOrNull(field(form, "control_scale"))};
    if (source === "image") body.control.image = await HINT.upload();
  }
  return body;
}

function showSamples(job, result) {
  const box = $("#sample-result");
  $(".command", box).textContent = result.command;
  $(".note", box).textContent = `${result.n} samples in ${result.seconds} s` +
    (result.note ? ` (${result.note})` : "") + (result.saved ? ` — saved in ${result.saved}` : "");
  const grid = $("#sample-grid");
  const tiles = $("#sample-tiles");
  tiles.replaceChildren();
  if (result.samples.length) {
    grid.hidden = true;
    result.samples.forEach((s, i) => {
      const fig = document.createElement("figure");
      fig.dataset.index = i;
      fig.dataset.seed = s.seed;
      const img = document.createElement("img");
      img.src = s.url;
      img.alt = `seed ${s.seed}`;
      const cap = document.createElement("figcaption");
      cap.textContent = `seed ${s.seed}` + (s.label ? ` · ${s.label}` : "");
      fig.append(img, cap);
      if (RUN.sections.trajectory) fig.addEventListener("click", () => busy(() => followTrajectory(i)));
      tiles.append(fig);
    });
  } else {
    grid.src = result.grid;
    grid.hidden = false;
  }
  if (result.trajectory) showTrajectory(result.trajectory);
  box.dataset.job = job;
}

let TRAJECTORY = null;

function showTrajectory(t) {
  TRAJECTORY = t;
  $("#trajectory").hidden = false;
  $("#traj-which").textContent = `seed ${t.seed}`;
  $$("#sample-tiles figure").forEach((f) => f.classList.toggle("selected", Number(f.dataset.index) === t.index));
  const slider = $("#traj-slider");
  slider.max = String(t.times.length - 1);
  slider.value = "0";
  showFrame(0);
  $("#trajectory").dataset.index = t.index;
}

function showFrame(k) {
  const t = TRAJECTORY;
  $("#traj-x").src = t.x[k];
  $("#traj-x0").src = t.x0[k];
  const time = t.times[k];
  const shown = Number.isInteger(time) ? String(time) : time.toFixed(3);
  $("#traj-label").textContent = `t = ${shown} (frame ${k + 1} of ${t.times.length})` +
    (t.note ? ` — ${t.note}` : "");
}

async function followTrajectory(index) {
  const {result} = await runJob("trajectory", {index});
  showTrajectory(result);
}

// -- drawing: the ControlNet hint (free strokes) and the restoration mask (pixels of the model's size) ----
const HINT = {
  file: null, // an uploaded file sent as it is, unless drawn over
  init() {
    const canvas = $("#hint-canvas");
    const ctx = canvas.getContext("2d");
    this.clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, canvas.width, canvas.height); this.file = null; };
    this.clear();
    let last = null;
    const at = (e) => {
      const r = canvas.getBoundingClientRect();
      return [(e.clientX - r.left) * canvas.width / r.width, (e.clientY - r.top) * canvas.height / r.height];
    };
    const stroke = (p) => {
      ctx.strokeStyle = "#fff";
      ctx.lineCap = "round";
      ctx.lineWidth = Number($("#hint-pen").value);
      ctx.beginPath();
      ctx.moveTo(...(last || p));
      ctx.lineTo(...p);
      ctx.stroke();
      last = p;
      this.file = null;
      field($("#sample-form"), "control_source").value = "image";
    };
    canvas.addEventListener("pointerdown", (e) => {
      canvas.setPointerCapture(e.pointerId);
      last = null;
      stroke(at(e));
    });
    canvas.addEventListener("pointermove", (e) => { if (e.buttons & 1) stroke(at(e)); });
    canvas.addEventListener("pointerup", () => { last = null; });
    $("#hint-clear").addEventListener("click", () => this.clear());
    $("#hint-file").addEventListener("change", async (e) => {
      const file = e.target.files[0];
      if (!file) return;
      try {
        const upload = await readFile(file);
        const img = await loadImage(upload.data);
        this.clear();
        ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
        this.file = upload;
        field($("#sample-form"), "control_source").value = "image";
      } catch (err) {
        status(err.message, "error");
      }
    });
  },
  async upload() {
    return this.file || {name: "hint.png", data: $("#hint-canvas").toDataURL("image/png")};
  },
};

const MASK = {
  cells: null, // 1 = generate (unknown), 0 = keep; H x W, the model's size
  background: null,
  init() {
    const [, H, W] = RUN.data_shape;
    this.H = H; this.W = W;
    this.cells = new Uint8Array(H * W);
    const canvas = $("#mask-canvas");
    const paint = (e) => {
      const r = canvas.getBoundingClientRect();
      const j = Math.floor((e.clientX - r.left) / r.width * W);
      const i = Math.floor((e.clientY - r.top) / r.height * H);
      const radius = Number($("#mask-brush").value);
      const value = $("#mask-erase").checked ? 0 : 1;
      for (let a = i - radius; a <= i + radius; a++) {
        for (let b = j - radius; b <= j + radius; b++) {
          const inside = a >= 0 && a < H && b >= 0 && b < W;
          if (inside && (a - i) ** 2 + (b - j) ** 2 <= radius * radius + radius) this.cells[a * W + b] = value;
        }
      }
      const select = field($("#restore-form"), "mask");
      if (select.value !== "drawn") select.value = "drawn";
      showRestoreFields();
      this.draw();
    };
    canvas.addEventListener("pointerdown", (e) => { canvas.setPointerCapture(e.pointerId); paint(e); });
    canvas.addEventListener("pointermove", (e) => { if (e.buttons & 1) paint(e); });
    $("#mask-clear").addEventListener("click", () => {
      this.cells.fill(0);
      field($("#restore-form"), "mask").value = "drawn";
      showRestoreFields();
    });
  },
  // the named masks of `diffusekit restore --mask` (runs/restore.py make_masks), for the preview
  preset(name) {
    const {H, W} = this;
    const h = Math.floor(H / 2), w = Math.floor(W / 2);
    const top = Math.floor((H - h) / 2), left = Math.floor((W - w) / 2);
    for (let i = 0; i < H; i++) {
      for (let j = 0; j < W; j++) {
        const center = i >= top && i < top + h && j >= left && j < left + w;
        const rule = {center, border: !center, left: j < w, right: j >= W - w, top: i < h, bottom: i >= H - h}[name];
        if (rule !== undefined) this.cells[i * W + j] = rule ? 1 : 0;
      }
    }
    this.draw();
  },
  draw() {
    const canvas = $("#mask-canvas");
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (this.background) ctx.drawImage(this.preview(this.background), 0, 0, canvas.width, canvas.height);
    const task = field($("#restore-form"), "task").value;
    const mask = field($("#restore-form"), "mask").value;
    if (!["inpaint", "outpaint"].includes(task) || [...PER_INPUT_MASKS, "file"].includes(mask)) return;
    const sx = canvas.width / this.W, sy = canvas.height / this.H;
    ctx.fillStyle = "rgba(230, 30, 30, 0.6)";
    for (let i = 0; i < this.H; i++) {
      for (let j = 0; j < this.W; j++) if (this.cells[i * this.W + j]) ctx.fillRect(j * sx, i * sy, sx, sy);
    }
  },
  // the image at the model's size, centre-cropped as the server reads it (data/images.py), for the preview
  preview(img) {
    const c = document.createElement("canvas");
    c.width = this.W; c.height = this.H;
    const side = Math.min(img.width, img.height);
    const [left, top] = [(img.width - side) / 2, (img.height - side) / 2];
    c.getContext("2d").drawImage(img, left, top, side, side, 0, 0, this.W, this.H);
    return c;
  },
  // the mask as a PNG of the model's size: white = generate, black = keep (what --mask FILE reads)
  png() {
    const c = document.createElement("canvas");
    c.width = this.W; c.height = this.H;
    const ctx = c.getContext("2d");
    const image = ctx.createImageData(this.W, this.H);
    this.cells.forEach((v, k) => { image.data.set([v * 255, v * 255, v * 255, 255], 4 * k); });
    ctx.putImageData(image, 0, 0);
    return {name: "mask.png", data: c.toDataURL("image/png")};
  },
};

// -- restore -----------------------------------------------------------------------------------------
// the numeric flags of `diffusekit restore` the form sets; a field is sent only where it applies (shown)
const RESTORE_NUMBERS = ["factor", "blur_size", "blur_width", "gain", "steps", "resample", "jump", "noise_std", "zeta",
  "measurement_seed"];

// Show the fields that apply: [data-tasks] to the task, [data-methods] to the method, [data-masks] to the mask.
function showRestoreFields() {
  const form = $("#restore-form");
  const chosen = {tasks: field(form, "task").value, methods: field(form, "method").value,
    masks: field(form, "mask").value};
  for (const [key, value] of Object.entries(chosen)) {
    $$(`#restore-form [data-${key}]`).forEach((el) => { el.hidden = !el.dataset[key].split(" ").includes(value); });
  }
  showZetaDefault();
  MASK.draw();
}

// DPS's step size when zeta is left empty: zeta_sqrt_steps / sqrt(steps) (runs/restore.py dps_zeta)
function showZetaDefault() {
  const form = $("#restore-form");
  const steps = numberOrNull(field(form, "steps")) || RUN.T;
  const c = RUN.defaults.restore.zeta_sqrt_steps;
  $("#zeta-default").textContent = `empty: ${c}/√${steps} = ${Number((c / Math.sqrt(steps)).toPrecision(3))}`;
}

// The task menu offers what the method can do: the tasks of RUN.choices.dps_tasks (blur, saturation) need dps.
function fillTasks() {
  const form = $("#restore-form");
  const select = field(form, "task");
  const dps = field(form, "method").value === "dps";
  const tasks = RUN.choices.task.filter((t) => dps || !RUN.choices.dps_tasks.includes(t));
  const before = select.value;
  fillSelect(select, tasks, tasks.includes(before) ? before : tasks[0]);
  if (select.value !== before) taskChanged();
}

// a new task: inpaint and outpaint start from their default mask (center, border)
function taskChanged() {
  const form = $("#restore-form");
  const task = field(form, "task").value;
  if (task === "inpaint" || task === "outpaint") {
    field(form, "mask").value = task === "inpaint" ? "center" : "border";
    MASK.preset(field(form, "mask").value);
  }
  showRestoreFields();
}

async function showRestoreInput() {
  const form = $("#restore-form");
  const files = $("#restore-files").files;
  try {
    if (form.querySelector("input[name=source]:checked").value === "upload" && files.length) {
      MASK.background = await loadImage((await readFile(files[0])).data);
    } else {
      MASK.background = await loadImage("/api/test-image/0");
    }
  } catch (e) {
    MASK.background = null;
  }
  MASK.draw();
}

async function restoreBody() {
  const form = $("#restore-form");
  const task = field(form, "task").value;
  const body = {task, method: field(form, "method").value, seeds: field(form, "seeds").value.trim(),
    ema: field(form, "ema").checked, save: field(form, "save").checked};
  for (const name of RESTORE_NUMBERS) {
    const el = field(form, name);
    if (visible(el) && el.value !== "") body[name] = Number(el.value);
  }
  if (task === "inpaint" || task === "outpaint") {
    const mask = field(form, "mask").value;
    body.mask = mask;
    if (mask === "drawn") body.mask_image = MASK.png();
    if (mask === "file") {
      const file = $("#mask-file").files[0];
      if (!file) throw new Error("--mask: choose a mask file (white pixels are generated)");
      body.mask_image = await readFile(file);
    }
    if (mask === "random") body.fraction = numberOrNull(field(form, "fraction"));
    if (PER_INPUT_MASKS.includes(mask)) body.mask_seed = numberOrNull(field(form, "mask_seed"));
  }
  if (form.querySelector("input[name=source]:checked").value === "upload") {
    const files = Array.from($("#restore-files").files);
    if (!files.length) throw new Error("--images: choose one or more image files to upload");
    body.images = await Promise.all(files.map(readFile));
  } else {
    body.n = numberOrNull(field(form, "n"));
  }
  return body;
}

function showRestored(job, result) {
  const box = $("#restore-result");
  $(".command", box).textContent = result.command;
  let text = result.summary; // the line `diffusekit restore` prints
  if (result.saved) text += ` — saved in ${result.saved}`;
  $(".note", box).textContent = text;
  const img = $("#restore-picture");
  img.src = result.picture;
  img.hidden = false;
  box.dataset.job = job;
}

// -- measure -----------------------------------------------------------------------------------------
function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;"}[c]));
}

// report.md as HTML: headings, code blocks, pictures (relative to ``base``), lists and paragraphs
function renderMarkdown(text, base) {
  const out = [];
  let code = null;
  for (const line of text.split("\n")) {
    if (line.startsWith("```")) {
      if (code === null) code = [];
      else { out.push(`<pre>${escapeHtml(code.join("\n"))}</pre>`); code = null; }
      continue;
    }
    if (code !== null) { code.push(line); continue; }
    const picture = line.match(/^!\[([^\]]*)\]\(([^)\s/]+)\)$/);
    const heading = line.match(/^(#{1,3}) (.*)$/);
    const src = picture && escapeHtml(base + encodeURIComponent(picture[2]));
    if (picture) out.push(`<img alt="${escapeHtml(picture[1])}" src="${src}">`);
    else if (heading) out.push(`<h${heading[1].length + 1}>${escapeHtml(heading[2])}</h${heading[1].length + 1}>`);
    else if (line.trim()) out.push(`<p>${escapeHtml(line)}</p>`);
  }
  if (code !== null) out.push(`<pre>${escapeHtml(code.join("\n"))}</pre>`);
  return out.join("\n");
}

async function showReport(url, base) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`the report cannot be read (${response.status})`);
  $("#report").innerHTML = renderMarkdown(await response.text(), base);
}

function evaluateBody() {
  const form = $("#evaluate-form");
  const metrics = $$("#metric-boxes input:checked").map((box) => box.value);
  const body = {metrics, strata: numberOrNull(field(form, "strata")), variance: field(form, "variance").value,
    save: field(form, "save").checked};
  if (metrics.includes("fd")) body.n_samples = numberOrNull(field(form, "n_samples"));
  return body;
}

// -- the page ----------------------------------------------------------------------------------------
function showTab(name) {
  $$("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  $$(".tab").forEach((t) => { t.hidden = t.id !== `tab-${name}`; });
}

async function start() {
  RUN = await api("/api/run");
  $("#run-info").textContent = `${RUN.run}: ${RUN.family} run (${RUN.summary}), step ${RUN.step}, ` +
    `data ${RUN.data_shape.join("x")}` + (RUN.num_classes ? `, ${RUN.num_classes} classes` : "");
  showSections();
  $$("#tabs button").forEach((b) => b.addEventListener("click", () => showTab(b.dataset.tab)));

  // sample
  const sform = $("#sample-form");
  const d = RUN.defaults.sample;
  fillSelect(field(sform, "sampler"), RUN.choices.sampler, d.sampler);
  fillSelect(field(sform, "grid"), RUN.choices.grid, d.grid);
  fillSelect(field(sform, "spacing"), RUN.choices.spacing, d.spacing);
  fillSelect(field(sform, "variance"), RUN.choices.variance, d.variance);
  for (const name of SAMPLER_FIELDS) {
    const el = field(sform, name);
    if (el && el.tagName === "INPUT" && d[name] !== null && d[name] !== undefined) el.value = d[name];
  }
  field(sform, "order").value = String(d.order);
  field(sform, "seeds").value = d.seeds;
  field(sform, "sampler").addEventListener("change", showSamplerFields);
  showSamplerFields();
  HINT.init();
  $("#traj-slider").addEventListener("input", (e) => showFrame(Number(e.target.value)));
  sform.addEventListener("submit", (e) => {
    e.preventDefault();
    busy(async () => {
      const body = await sampleBody();
      const {job, result} = await runJob("sample", body);
      showSamples(job, result);
    });
  });

  // restore
  if (RUN.sections.restore) {
    const rform = $("#restore-form");
    fillSelect(field(rform, "method"), RUN.choices.method, "repaint");
    fillSelect(field(rform, "mask"), [...RUN.choices.mask, "drawn", "file"], "center");
    for (const [name, value] of Object.entries(RUN.defaults.restore)) {
      const el = field(rform, name);
      if (el && el.tagName === "INPUT" && value !== null) el.value = value;
    }
    MASK.init();
    MASK.preset("center");
    fillTasks();
    field(rform, "task").addEventListener("change", taskChanged);
    field(rform, "method").addEventListener("change", () => { fillTasks(); showRestoreFields(); });
    field(rform, "steps").addEventListener("input", showZetaDefault);
    field(rform, "mask").addEventListener("change", () => {
      MASK.preset(field(rform, "mask").value);
      showRestoreFields();
    });
    $$("input[name=source]", rform).forEach((r) => r.addEventListener("change", showRestoreInput));
    $("#restore-files").addEventListener("change", () => {
      rform.querySelector("input[name=source][value=upload]").checked = true;
      showRestoreInput();
    });
    showRestoreFields();
    showRestoreInput();
    rform.addEventListener("submit", (e) => {
      e.preventDefault();
      busy(async () => {
        const body = await restoreBody();
        const {job, result} = await runJob("restore", body);
        showRestored(job, result);
      });
    });
  }

  // measure
  if (RUN.sections.measure) {
    const eform = $("#evaluate-form");
    const ed = RUN.defaults.evaluate;
    $("#metric-boxes").replaceChildren(...RUN.choices.metrics.map((m) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = m;
      box.checked = ed.metrics.includes(m);
      box.addEventListener("change", showMetricFields);
      label.append(box, ` ${m}`);
      return label;
    }));
    fillSelect(field(eform, "variance"), RUN.choices.bound_variance, ed.variance);
    field(eform, "strata").value = ed.strata;
    field(eform, "n_samples").value = ed.n_samples;
    showMetricFields();
    if (RUN.report) {
      const report = await api("/api/report");
      if (report.markdown) $("#report").innerHTML = renderMarkdown(report.markdown, report.base);
    }
    eform.addEventListener("submit", (e) => {
      e.preventDefault();
      busy(async () => {
        const {job, result} = await runJob("evaluate", evaluateBody());
        $("#evaluate-result .command").textContent = result.command;
        await showReport(result.report, result.base);
        $("#evaluate-result").dataset.job = job;
      });
    });
  }
  document.body.dataset.state = "idle";
}

function showMetricFields() {
  const chosen = $$("#metric-boxes input:checked").map((box) => box.value);
  $$("#evaluate-form [data-metric]").forEach((el) => { el.hidden = !chosen.includes(el.dataset.metric); });
}

start().catch((e) => { status(e.message, "error"); document.body.dataset.state = "error"; });
